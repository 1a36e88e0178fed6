"""Training configuration: one typed dataclass whose fields are Megatron-LM's flag names (``--lr`` <-> ``lr``).

Unknown keys are rejected; cross-field rules are checked once in ``TrainConfig.validate`` with a message naming
the flag to change; the resolved config is written next to the checkpoints (``train_config.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from ..checkpoint.paths import check_output_path
from ..errors import ConfigError

RECOMPUTE = (None, "selective", "full")
FP8_FORMATS = (None, "hybrid", "e4m3")
PARALLEL_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")  # what TP / PP are called here
EP_FLAG = "--expert-model-parallel-size"
MOE_DISPATCHERS = ("allgather", "alltoall")
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
MOE_ROUTER_DTYPES = (None, "fp32", "fp64")

Config = TypeVar("Config")


def config_from_dict(cls: type[Config], values: dict, unknown_keys: str) -> Config:
    """``cls(**values)`` for a config dataclass, refusing keys that are not its fields with one ConfigError line,
    ``"<unknown_keys>: a, b"`` (a misspelt setting must not reach the constructor as a TypeError traceback)."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{unknown_keys}: {', '.join(unknown)}")
    return cls(**values)


@dataclass
class TrainConfig:
    # --- what to train ---
    mode: str = field(default="pretrain", metadata={"help": "pretrain | finetune (set by the subcommand)"})
    model_name: str | None = field(default=None, metadata={
        "help": "model family (llama, qwen, ...); read from the --load checkpoint when omitted"})
    model_size: str | None = field(default=None, metadata={
        "help": "size preset of the family (listed below); builds the model without --load, and is checked "
                "against a --load checkpoint"})
    tokenizer_model: str | None = field(default=None, metadata={
        "help": "tokenizer (HF dir, sentencepiece .model, qwen.tiktoken); default: the checkpoint's hf_assets"})
    extra_vocab_size: int = field(default=0, metadata={"help": "new token rows added to the vocabulary"})
    make_vocab_size_divisible_by: int = field(default=128, metadata={
        "help": "vocab padding multiple (times TP); the padded size is computed, never given"})
    transformer_impl: str = field(default="local", metadata={
        "help": "local (megatron-core's torch layers) | transformer_engine (needed by FP8, flash attention, SP)"})
    # --- parallelism ---
    tensor_model_parallel_size: int = field(default=1, metadata={"help": "tensor-parallel size (divides the heads)"})
    pipeline_model_parallel_size: int = field(default=1, metadata={"help": "pipeline-parallel size (<= layers)"})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "shard activations along the sequence across TP ranks (needs TP > 1 and Transformer Engine)"})
    expert_model_parallel_size: int = field(default=1, metadata={
        "help": "expert-parallel size of a mixture-of-experts model: each rank holds num_experts / EP routed experts "
                "(carved out of data parallelism: EP must divide world size / (TP x PP))"})
    use_distributed_optimizer: bool = field(default=False, metadata={
        "help": "shard optimizer state across data-parallel ranks"})
    # --- mixture of experts (routing itself comes from the model: experts, top-k, normalisation) ---
    moe_token_dispatcher_type: str = field(default="alltoall", metadata={
        "help": "how tokens reach their experts' ranks: alltoall | allgather"})
    moe_router_load_balancing_type: str = field(default="aux_loss", metadata={
        "help": "load-balancing loss: aux_loss (per micro-batch) | seq_aux_loss (per sequence) | none"})
    moe_aux_loss_coeff: float = field(default=0.0, metadata={
        "help": "weight of the load-balancing loss (HF's router_aux_loss_coef; 0 = logged off)"})
    moe_z_loss_coeff: float | None = field(default=None, metadata={"help": "weight of the router z-loss (off)"})
    moe_router_dtype: str | None = field(default=None, metadata={
        "help": "router logits and routing in fp32 | fp64 (default: the model's dtype)"})
    # --- batch and schedule ---
    micro_batch_size: int = field(default=1, metadata={"help": "samples per forward pass on one rank"})
    global_batch_size: int = field(default=8, metadata={
        "help": "samples per optimizer step (a multiple of micro batch x data-parallel size)"})
    seq_length: int = field(default=128, metadata={"help": "tokens per sample"})
    train_iters: int | None = field(default=None, metadata={
        "help": "optimizer steps (required for pretraining; finetuning derives them from --epochs when omitted)"})
    epochs: int = field(default=1, metadata={"help": "passes over --train-data-path", "mode": "finetune"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the decay"})
    lr_decay_style: str = field(default="cosine", metadata={"help": "cosine | linear | constant"})
    lr_warmup_iters: int = field(default=0, metadata={"help": "linear warmup steps from 0 to --lr"})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "decay steps (default: --train-iters)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient clipping by global norm (0 = off)"})
    calculate_per_token_loss: bool = field(default=False, metadata={
        "help": "gradient of the token mean over the whole global batch (transformers' Trainer) instead of "
                "Megatron-LM's mean of each micro-batch's token mean"})
    # --- precision ---
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and compute, fp32 main weights"})
    fp16: bool = field(default=False, metadata={"help": "fp16 weights and compute with loss scaling"})
    loss_scale: float | None = field(default=None, metadata={
        "help": "static fp16 loss scale (default: dynamic, starting at --initial-loss-scale)"})
    initial_loss_scale: float = field(default=2.0**16, metadata={"help": "first dynamic fp16 loss scale"})
    fp8_format: str | None = field(default=None, metadata={
        "help": "hybrid (E4M3 forward / E5M2 backward) | e4m3; needs --bf16 and Transformer Engine on Hopper/Ada"})
    fp8_amax_history_len: int = field(default=1024, metadata={"help": "FP8 delayed scaling: amax history length"})
    fp8_amax_compute_algo: str = field(default="max", metadata={"help": "FP8 delayed scaling: max | most_recent"})
    use_flash_attn: bool = field(default=False, metadata={"help": "flash attention through Transformer Engine"})
    recompute_granularity: str | None = field(default=None, metadata={
        "help": "activation recompute: selective | full (default: off)"})
    recompute_method: str = field(default="uniform", metadata={"help": "full recompute: uniform | block"})
    recompute_num_layers: int = field(default=1, metadata={"help": "full recompute: layers per recompute unit"})
    # --- data ---
    data_path: list[str] | None = field(default=None, metadata={
        "help": "indexed dataset prefixes, optionally weighted: [W1] PREFIX1 [W2 PREFIX2 ...]", "mode": "pretrain"})
    split: str = field(default="99,1,0", metadata={"help": "train,valid,test weights of --data-path",
                                                   "mode": "pretrain"})
    data_cache_path: str | None = field(default=None, metadata={
        "help": "where GPTDataset caches its sample indices (default: data_cache/ beside the --save directory)",
        "mode": "pretrain"})
    train_data_path: str | None = field(default=None, metadata={
        "help": 'SFT jsonl, one sample per line: {"instruction": ..., "input": ... (optional), "output": ...} or '
                '{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}', "mode": "finetune"})
    valid_data_path: str | None = field(default=None, metadata={
        "help": "SFT validation jsonl (same schema)", "mode": "finetune"})
    max_padding_length: int | None = field(default=None, metadata={
        "help": "pad (or truncate) each sample to this length (default: --seq-length)", "mode": "finetune"})
    sft_packing: bool = field(default=False, metadata={"help": "pack several samples per sequence",
                                                       "mode": "finetune"})
    # --- LoRA (layers/lora.py) ---
    lora_rank: int = field(default=0, metadata={
        "help": "train low-rank adapters of this rank on the frozen model (0 = train every parameter)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator: adapters add alpha/rank x B A"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "linears that get adapters: linear_qkv linear_proj linear_fc1 linear_fc2 (default: all four)"})
    # --- checkpoints ---
    load: str | None = field(default=None, metadata={
        "help": "checkpoint to start from: an hf2mcore output or a training checkpoint"})
    save: str | None = field(default=None, metadata={
        "help": "checkpoint directory of this run; a restarted job resumes from it"})
    save_interval: int | None = field(default=None, metadata={
        "help": "save every N steps (default: only at the end)"})
    no_load_optim: bool = field(default=False, metadata={"help": "resume without the optimizer state"})
    no_load_rng: bool = field(default=False, metadata={"help": "resume without the RNG state"})
    no_verify_checksums: bool = field(default=False, metadata={
        "help": "load checkpoints without checking their checksums.json (a changed file is otherwise refused)"})
    finetune: bool = field(default=False, metadata={"help": "load weights only and restart at iteration 0"})
    override_opt_param_scheduler: bool = field(default=False, metadata={
        "help": "resuming: take the LR schedule from these flags, not from the checkpoint",
        "aliases": ("--override-opt_param-scheduler",)})
    use_checkpoint_opt_param_scheduler: bool = field(default=False, metadata={
        "help": "resuming: keep the checkpoint's LR schedule whatever these flags say (without either, a resumed "
                "run whose schedule differs from its checkpoint's is refused, as in Megatron-LM)",
        "aliases": ("--use-checkpoint-opt_param-scheduler",)})
    # --- logging, eval ---
    log_interval: int = field(default=1, metadata={"help": "print a log line every N steps"})
    eval_interval: int | None = field(default=None, metadata={"help": "validate every N steps (default: off)"})
    eval_iters: int = field(default=2, metadata={"help": "validation steps per evaluation", "mode": "pretrain"})
    tensorboard_dir: str | None = field(default=None, metadata={"help": "TensorBoard event directory"})
    seed: int = field(default=1234, metadata={"help": "random seed"})
    exit_interval: int | None = field(default=None, metadata={"help": "stop after this iteration (for tests)"})
    distributed_timeout_minutes: float = field(default=10.0, metadata={
        "help": "end the run when a collective waits longer than this (a frozen or lost rank; default: 10)"})

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return config_from_dict(cls, data, "unknown config keys")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def params_dtype_name(self) -> str:
        return "bfloat16" if self.bf16 or self.fp8_format else "float16" if self.fp16 else "float32"

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check every cross-field rule once; the error names the flag to change."""
        def fail(message):
            raise ConfigError(message)

        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.mode not in ("pretrain", "finetune"):
            fail(f"mode must be pretrain or finetune (got {self.mode})")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                     "global_batch_size", "seq_length", "log_interval", "epochs"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if world_size % (tp * pp):
            fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                 f"--pipeline-model-parallel-size = {tp}x{pp}")
        dp = world_size // (tp * pp)
        ep = self.expert_model_parallel_size
        if ep < 1:
            fail(f"{EP_FLAG} must be >= 1 (got {ep})")
        if dp % ep:
            fail(f"{EP_FLAG} {ep} does not divide the data-parallel size {dp} (world size {world_size} / TP x PP "
                 f"{tp}x{pp}): expert parallelism is carved out of data parallelism")
        if self.moe_token_dispatcher_type not in MOE_DISPATCHERS:
            fail(f"--moe-token-dispatcher-type must be one of {', '.join(MOE_DISPATCHERS)} "
                 f"(got {self.moe_token_dispatcher_type})")
        if self.moe_router_load_balancing_type not in MOE_LOAD_BALANCING:
            fail(f"--moe-router-load-balancing-type must be one of {', '.join(MOE_LOAD_BALANCING)} "
                 f"(got {self.moe_router_load_balancing_type})")
        if self.moe_router_dtype not in MOE_ROUTER_DTYPES:
            fail(f"--moe-router-dtype must be fp32 or fp64 (got {self.moe_router_dtype})")
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0):
            fail("--moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")
        if self.global_batch_size % (self.micro_batch_size * dp):
            fail(f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                 f"{self.micro_batch_size} x data-parallel size {dp}")
        if self.sequence_parallel and tp == 1:
            fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and self.transformer_impl != "transformer_engine":
            fail("--sequence-parallel needs --transformer-impl transformer_engine "
                 "(megatron-core's local layer spec uses torch norms, which do not support sequence parallelism)")
        if self.bf16 and self.fp16:
            fail("--bf16 and --fp16 are exclusive")
        if self.fp8_format not in FP8_FORMATS:
            fail(f"--fp8-format must be one of hybrid, e4m3 (got {self.fp8_format})")
        if self.fp8_format and not self.bf16:
            fail("--fp8-format needs --bf16 (FP8 runs on top of bf16 weights)")
        if self.fp8_format and self.transformer_impl != "transformer_engine":
            fail("--fp8-format needs --transformer-impl transformer_engine")
        if self.use_flash_attn and self.transformer_impl != "transformer_engine":
            fail("--use-flash-attn needs --transformer-impl transformer_engine (flash attention through TE)")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            fail(f"--fp8-amax-compute-algo must be max or most_recent (got {self.fp8_amax_compute_algo})")
        if self.recompute_granularity not in RECOMPUTE:
            fail(f"--recompute-granularity must be selective or full (got {self.recompute_granularity})")
        if self.recompute_method not in ("uniform", "block"):
            fail(f"--recompute-method must be uniform or block (got {self.recompute_method})")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            fail(f"--lr-decay-style must be cosine, linear or constant (got {self.lr_decay_style})")
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"--{spec.name.replace('_', '-')} must be a finite number (got {value})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(self, name)})")
        if self.weight_decay < 0:
            fail(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.eval_iters < 0:
            fail(f"--eval-iters must be >= 0 (got {self.eval_iters})")
        if self.mode == "pretrain":
            check_split(self.split)
        if self.min_lr > self.lr:
            fail(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.extra_vocab_size < 0:
            fail(f"--extra-vocab-size must be >= 0 (got {self.extra_vocab_size})")
        if self.mode == "pretrain":
            if not self.data_path:
                fail("pretraining needs --data-path")
            if self.train_iters is None or self.train_iters < 1:
                fail("pretraining needs --train-iters >= 1")
        else:
            if not self.train_data_path:
                fail("finetuning needs --train-data-path")
            if self.max_padding_length is not None and self.max_padding_length > self.seq_length:
                fail(f"--max-padding-length {self.max_padding_length} is larger than --seq-length {self.seq_length}")
        if self.lr_warmup_iters < 0 or (self.train_iters and self.lr_warmup_iters > self.train_iters):
            fail(f"--lr-warmup-iters {self.lr_warmup_iters} must be between 0 and --train-iters {self.train_iters}")
        if self.load is None and self.model_size is None and self.model_name is not None:
            fail("without --load, pass --model-size to pick a preset of the family")
        if self.load is None and self.model_name is None:
            fail("pass --load (a converted checkpoint) or --model-name and --model-size")
        if self.load is None and self.tokenizer_model is None:
            fail("without --load, pass --tokenizer-model (the launch scripts: TOKENIZER_MODEL=<dir or .model>)")
        self.check_lora()
        if self.save_interval is not None and self.save_interval < 1:
            fail(f"--save-interval must be >= 1 (got {self.save_interval})")
        if self.distributed_timeout_minutes <= 0:
            fail(f"--distributed-timeout-minutes must be > 0 (got {self.distributed_timeout_minutes})")
        if self.save_interval and not self.save:
            fail("--save-interval needs --save")
        for name in ("save", "tensorboard_dir", "data_cache_path"):  # "" would write into the current directory
            if getattr(self, name) is not None:
                check_output_path(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            fail("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive")
        return self

    def check_lora(self) -> None:
        """The --lora-* rules (also checked by trainers that skip ``validate``, e.g. PPO / GRPO)."""
        if self.lora_rank:
            self.lora_config()
            if self.load is None:
                raise ConfigError("--lora-rank needs --load (the checkpoint whose frozen weights the adapters train on)")
            if self.fp8_format:
                raise ConfigError("--lora-rank does not support --fp8-format (the adapters run on the local spec, "
                                  "without FP8)")
            if self.transformer_impl != "local":
                raise ConfigError("--lora-rank needs --transformer-impl local (Transformer Engine's fused "
                                  "LayerNorm-linear hides the normalised input an adapter reads)")
        elif self.lora_target_modules:
            raise ConfigError("--lora-target-modules needs --lora-rank")

    def lora_config(self):
        """The LoRAConfig of --lora-*, validated; None without --lora-rank."""
        if not self.lora_rank:
            return None
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (got {self.lora_rank})")
        from ..layers.lora_config import TARGET_MODULES, LoRAConfig  # lazy: it imports torch, the CLI parses without

        targets = tuple(self.lora_target_modules or TARGET_MODULES)
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets).validate()

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "train_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def check_split(split: str) -> None:
    """``--split`` as megatron-core reads it: up to three non-negative weights (train, valid, test) separated by
    ``,`` or ``/``, the train weight positive (``0`` or garbage failed later, as a traceback or with no data)."""
    words = re.split(r"[,/]", split)
    try:
        weights = [float(word) for word in words]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or weights[0] <= 0:
        raise ConfigError(f"--split must be up to three weights train,valid,test (e.g. 99,1,0) with a positive train "
                          f"weight (got {split!r})")


# --- argparse, generated from the dataclass: one flag per field ---------------------------------------------------


def _base_type(annotation: str):
    text = annotation.replace(" ", "")
    for name, typ in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if text.startswith(name) or text.startswith(f"{name}|"):
            return typ
    if text.startswith("list[str]"):
        return list
    raise TypeError(f"unsupported config annotation {annotation}")


def add_field_argument(parser, f, flags: list[str] | None = None) -> None:
    """One dataclass field as a flag, with the conventions of every flag of this toolkit (Megatron-LM's).

    The flag is ``--field-name`` (plus ``flags`` given, e.g. Megatron-LM's other spelling); its type is the
    annotation's; the default is said once in the help. A boolean is one switch: ``--flag`` turns on what is off by
    default; a field that is on by default is turned off by ``--no-flag`` (Megatron-LM's ``--no-load-optim``); a field
    whose default a preset decides (None) takes either. Never ``--flag true``.
    """
    flags = flags or ["--" + f.name.replace("_", "-")]
    typ = _base_type(str(f.type))
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not MISSING else None
    if typ is bool:
        if default is None:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif default:
            parser.add_argument(*["--no-" + flag[2:] for flag in flags], dest=f.name, action="store_false",
                                default=True, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, action="store_true", default=False, help=help_text)
    elif typ is list:
        parser.add_argument(*flags, dest=f.name, nargs="+", default=default, help=help_text)
    else:
        if default is not None and "default" not in help_text:  # one default per flag, said once
            help_text = f"{help_text} (default: {default})"
        parser.add_argument(*flags, dest=f.name, type=typ, default=default, help=help_text)


def add_config_arguments(parser: argparse.ArgumentParser, mode: str = "pretrain") -> None:
    """One flag per TrainConfig field that ``mode`` uses (pretraining and finetuning each list only their own)."""
    for f in fields(TrainConfig):
        if f.name == "mode" or f.metadata.get("mode", mode) != mode:
            continue
        add_field_argument(parser, f, ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())])


def config_from_args(args: argparse.Namespace, mode: str) -> TrainConfig:
    data = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "mode" and hasattr(args, f.name)}
    return TrainConfig.from_dict({**data, "mode": mode})
