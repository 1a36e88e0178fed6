"""Build what a run trains: the model source (a converted checkpoint or a size preset), the megatron-core model
wrapped in megatron-core DDP, its optimizer and the LR/WD scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.checksums import set_verification
from ..checkpoint.hf import asset_files
from ..checkpoint.megatron import TRACKER, assets_root, is_model_variant
from ..checkpoint.paths import check_disjoint
from ..checkpoint.torch_dist_io import TorchDistReader
from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from ..errors import ConfigError, MachineSupportError, OverlappingPathsError
from ..layers.lora_config import layer_shapes
from ..models.checkpoint import Checkpoint
from ..models.presets import check_size_preset
from ..models.spec import ModelSpec
from ..runtime.cpu import cuda_available
from ..runtime.device import place_model
from .arguments import EP_FLAG, PARALLEL_FLAGS, TrainConfig
from .checkpointing import TRAIN_STATE


@dataclass
class ModelSource:
    """What the model is (its spec) and where its weights, if any, and tokenizer files come from."""

    spec: ModelSpec
    checkpoint: Checkpoint | None  # the --load checkpoint
    assets_dir: Path | None  # tokenizer / config files copied into every saved checkpoint

    @property
    def arch(self):
        return self.spec.arch

    @property
    def hf_config(self) -> dict:
        return self.spec.hf_config


def resolve_model_source(cfg: TrainConfig, load_dir: Path | None) -> ModelSource:
    """From the checkpoint's metadata when loading one, else from ``--model-name`` / ``--model-size``.

    Checks the flags against the model on the way (family, size preset, extra vocabulary, TP x PP, --seq-length),
    each error naming the training flag to change. The ranks and ``train check`` both run it.
    """
    set_verification(not cfg.no_verify_checksums)  # every checkpoint the run opens from here on
    if cfg.save and load_dir is not None:
        check_save_keeps_load(cfg.save, load_dir)
    source = _model_source(cfg, load_dir)
    if source.checkpoint is not None and source.checkpoint.meta["format"] == "torch_dist":
        check_torch_dist_checkpoint(load_dir)  # vetted before anything is written (data_cache/ stayed behind)
    positions = source.arch.max_position_embeddings
    if positions and cfg.seq_length > positions:  # generation refuses the same; RoPE/positions beyond are untrained
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the {positions} positions the model was built for "
                          "(max_position_embeddings)")
    return source


def check_stored_shapes(ckpt: Checkpoint) -> None:
    """The stored shapes are the recorded ones before a model of the recorded sizes is built (a crafted hidden size
    of 10^6 allocated it first). Reads headers only; a reward model's or critic's head is theirs to check."""
    if ckpt.meta["format"] == "torch_dist":
        TorchDistReader(ckpt.iter_dir).check_matches(ckpt.sharding(), backbone_only=True)
    else:
        ckpt.reader()


def check_save_keeps_load(save: str, load_dir: Path) -> None:
    """A --save that overlaps the checkpoint the run starts from is refused unless that checkpoint is one a run
    saved (it has ``train_state/``: resuming into the same directory is Megatron-LM's usage). A converted
    checkpoint is an input: training would write ``data_cache/``, its iterations and its tracker into it."""
    if (load_dir / TRAIN_STATE).is_dir():
        return
    root = load_dir.parent if (load_dir.parent / TRACKER).is_file() else load_dir
    try:
        check_disjoint(root, save, "--load", "--save")
    except OverlappingPathsError:
        raise OverlappingPathsError(f"--save {save} overlaps the checkpoint {root} the run starts from, which holds no "
                                    "training state (a converted checkpoint): training would write into it; pass it "
                                    "as --load and choose a new --save") from None


def _model_source(cfg: TrainConfig, load_dir: Path | None) -> ModelSource:
    """From the checkpoint's metadata when loading one, else from ``--model-name`` / ``--model-size``.

    Checks the flags against the model on the way (family, size preset, extra vocabulary, TP x PP), each error
    naming the training flag to change.
    """
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if load_dir is not None:
        ckpt = Checkpoint.open(load_dir)
        spec = ckpt.spec
        if cfg.model_name and cfg.model_name != spec.family.name:
            raise ConfigError(f"--model-name {cfg.model_name} does not match the --load checkpoint ({spec.family.name})")
        if cfg.extra_vocab_size and cfg.extra_vocab_size != spec.extra_vocab_size:
            raise ConfigError(
                f"--extra-vocab-size {cfg.extra_vocab_size} differs from the checkpoint's {spec.extra_vocab_size}: "
                "new token rows are added at conversion (hf2mcore --extra-vocab-size)"
            )
        if cfg.model_size and cfg.model_size != "auto":  # a preset must describe the checkpoint
            try:
                check_size_preset(spec.family, cfg.model_size, spec.hf_config)
            except ConfigError as error:
                raise ConfigError(f"{error}; or omit --model-size (MODEL_SIZE=auto in the launch scripts): the "
                                  "shape is read from the checkpoint") from None
        spec.arch.check_parallel(tp, pp, PARALLEL_FLAGS)
        check_moe_flags(cfg, spec.arch)
        spec.sharding(tp, pp, cfg.expert_model_parallel_size)
        check_lora_shapes(cfg, spec)
        if not is_model_variant(ckpt.iter_dir):  # adapters only: checked against the model built, when it loads
            check_stored_shapes(ckpt)
        if ckpt.assets_dir is not None:  # copied into every checkpoint saved: a link out of --load is refused now
            asset_files(ckpt.assets_dir, assets_root(ckpt.iter_dir, ckpt.assets_dir))
        return ModelSource(spec, ckpt, ckpt.assets_dir)
    spec = ModelSpec.from_flavor(cfg.model_name, cfg.model_size, tp=tp, extra_vocab_size=cfg.extra_vocab_size,
                                 make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    spec.arch.check_parallel(tp, pp, PARALLEL_FLAGS)
    check_moe_flags(cfg, spec.arch)
    spec.sharding(tp, pp, cfg.expert_model_parallel_size)
    check_lora_shapes(cfg, spec)
    assets = Path(cfg.tokenizer_model) if cfg.tokenizer_model and Path(cfg.tokenizer_model).is_dir() else None
    return ModelSource(spec, None, assets)


def check_lora_shapes(cfg: TrainConfig, spec: ModelSpec) -> None:
    """--lora-rank no larger than any targeted layer of the model (before anything is built)."""
    lora = cfg.lora_config()
    if lora is not None:
        lora.check_shapes(layer_shapes(spec.arch))


# The MoE flags and their defaults: set on a dense model, each is a mistake worth one line.
_MOE_FLAG_DEFAULTS = {name: TrainConfig.__dataclass_fields__[name].default for name in (
    "expert_model_parallel_size", "moe_token_dispatcher_type", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
    "moe_z_loss_coeff", "moe_router_dtype")}


def check_moe_flags(cfg: TrainConfig, arch) -> None:
    """Refuse MoE flags for a dense model, and an expert-parallel size the experts cannot be split by."""
    if not arch.is_moe:
        set_flags = [f"--{name.replace('_', '-')}" for name, default in _MOE_FLAG_DEFAULTS.items()
                     if getattr(cfg, name) != default]
        if set_flags:
            raise ConfigError(f"{', '.join(set_flags)} given for a dense model (it has no experts)")
        return
    arch.check_expert_parallel(cfg.expert_model_parallel_size, EP_FLAG)
    if cfg.transformer_impl != "local":
        raise ConfigError("mixture-of-experts models train with --transformer-impl local only (megatron-core's TE "
                          "spec stores a MoE layer's pre-MLP norm under another checkpoint key)")


def moe_config_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig fields of a MoE model's training flags (expert parallelism, dispatcher, losses)."""
    return dict(
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.tensor_model_parallel_size,  # megatron-core's default: experts split as TP
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff,
        moe_router_dtype=cfg.moe_router_dtype,
    )


def load_model_tokenizer(cfg: TrainConfig, source: ModelSource):
    """The run's tokenizer: ``--tokenizer-model``, else the checkpoint's ``hf_assets``; refused (one line) when it has
    more ids than the model has embedding rows."""
    from ..data.tokenizers import load_tokenizer

    tokenizer_path = cfg.tokenizer_model or source.assets_dir
    if tokenizer_path is None:
        raise ConfigError("no tokenizer: pass --tokenizer-model (the checkpoint has no hf_assets)")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > source.spec.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {source.spec.vocab_size} "
                          "rows: pass --extra-vocab-size (or convert with hf2mcore --extra-vocab-size)")
    return tokenizer


def check_precision_support(cfg: TrainConfig) -> None:
    """Stop before any work when the machine cannot run what was asked, naming what is missing and the way out
    (the flag to drop, and the launch scripts' argument that sets it)."""
    from ..models.builder import have_transformer_engine

    if cfg.transformer_impl == "transformer_engine" or cfg.fp8_format or cfg.use_flash_attn:
        missing = [what for what, ok in (("a CUDA GPU", cuda_available()),
                                          ("Transformer Engine (pip install 'megatron-patch[gpu]')",
                                           have_transformer_engine())) if not ok]
        if missing:
            if cfg.fp8_format:
                what, way_out = "FP8", "train in bf16 instead: --bf16 without --fp8-format (PR=bf16 in the launch scripts)"
            elif cfg.use_flash_attn:
                what, way_out = "flash attention", "drop --use-flash-attn (FL=false in the launch scripts)"
            elif cfg.sequence_parallel:
                what, way_out = "sequence parallelism", "drop --sequence-parallel (SP=false in the launch scripts)"
            else:
                what, way_out = "Transformer Engine layers", "use --transformer-impl local (TE=false in the launch scripts)"
            raise MachineSupportError(f"{what} needs {' and '.join(missing)}, which this machine lacks: {way_out}")
        if cfg.fp8_format:
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                raise MachineSupportError(f"FP8 needs a Hopper (sm_90) or Ada (sm_89) GPU; this GPU is sm_{major}{minor}: "
                                          "train in bf16 instead (PR=bf16 in the launch scripts)")


def model_config_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig fields the training flags set (and the CPU needs)."""
    over = dict(
        sequence_parallel=cfg.sequence_parallel,
        recompute_granularity=cfg.recompute_granularity,
        calculate_per_token_loss=cfg.calculate_per_token_loss,
    )
    if cfg.recompute_granularity == "full":
        over.update(recompute_method=cfg.recompute_method, recompute_num_layers=cfg.recompute_num_layers)
    if cfg.fp8_format:
        over.update(fp8=cfg.fp8_format, fp8_amax_history_len=cfg.fp8_amax_history_len,
                    fp8_amax_compute_algo=cfg.fp8_amax_compute_algo, fp8_recipe="delayed")
    if cfg.transformer_impl == "transformer_engine":
        from megatron.core.transformer.enums import AttnBackend

        over["attention_backend"] = AttnBackend.flash if cfg.use_flash_attn else AttnBackend.auto
    if not cuda_available():
        # The fused kernels are CUDA (or TorchScript-for-CUDA) code paths.
        over.update(bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                    persist_layer_norm=False, gradient_accumulation_fusion=False)
    return over


def build_transformer_config(cfg: TrainConfig, source: ModelSource):
    from ..models.builder import transformer_config

    return transformer_config(
        source.arch,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        params_dtype=getattr(torch, cfg.params_dtype_name),
        **model_config_overrides(cfg),
        **(moe_config_overrides(cfg) if source.arch.is_moe else {}),
    )


def build_ddp_model(cfg: TrainConfig, source: ModelSource, config):
    """One pipeline stage as a GPTModel on this rank's device inside megatron-core's DistributedDataParallel."""
    from ..models.builder import build_model

    module = build_model(source.arch, source.spec.padded_vocab_size, config=config,
                         transformer_impl=cfg.transformer_impl, vocab_size=source.spec.vocab_size,
                         lora=cfg.lora_config(), lora_seed=cfg.seed)
    return wrap_in_ddp(cfg, place_model(module), config)


def wrap_in_ddp(cfg: TrainConfig, module, config):
    """A placed model stage inside megatron-core's DistributedDataParallel (grads reduced in fp32, not overlapped).

    Placed before wrapping (as Megatron-LM's get_model does): DDP allocates its gradient buffers, and the optimizer
    its fp32 main copies, next to the parameters they find.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)


def attach_schedule_hooks(config, model, optimizer) -> None:
    """Hand a trained model's DDP and optimizer to megatron-core's pipeline schedule, which reads them off ``config``.

    ``no_sync_func``: no gradient reduction until the last micro-batch; ``finalize_model_grads_func``: the
    data-parallel reduction (and the pipeline's shared embedding grads) after it; ``grad_scale_func``: the fp16
    loss scale on each micro-batch's loss. A frozen model's config gets none of them.
    """
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def build_optimizer(cfg: TrainConfig, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        params_dtype=getattr(torch, cfg.params_dtype_name),
        loss_scale=cfg.loss_scale,
        initial_loss_scale=cfg.initial_loss_scale,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    use_fused_adam(optimizer)
    return optimizer


def use_fused_adam(optimizer) -> None:
    """Run the Adam update of a megatron-core optimizer through torch's fused kernel, where torch has one.

    Without Transformer Engine or apex (whose FusedAdam megatron-core prefers) megatron-core falls back to
    ``torch.optim.AdamW`` with torch's default multi-tensor implementation: about seven passes over every main
    weight per step, 23.6 ms of an 84 ms step at the 7B-layer shape on an H200, where the fused kernel makes one
    pass (8.7 ms in the transformers loop beside it). Same update up to rounding; the optimizer state is unchanged.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if any(p.device.type not in supported or not p.is_floating_point() for p in params):
            continue
        for group in [*inner.param_groups, inner.defaults]:
            group.update(foreach=False, fused=True)


def build_scheduler(cfg: TrainConfig, optimizer, train_iters: int):
    """Linear warmup from 0 to --lr over --lr-warmup-iters, then --lr-decay-style down to --min-lr.

    megatron-core's scheduler counts samples; iterations are converted with the global batch size.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = cfg.global_batch_size
    decay_iters = cfg.lr_decay_iters or train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=max(decay_iters, cfg.lr_warmup_iters + 1) * gbs,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(train_iters, 1) * gbs,
        wd_incr_style="constant",
        # Without either flag, a resumed schedule was checked equal to the checkpoint's (check_resumed_schedule).
        use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )


# What a resumed run's LR schedule is compared on (megatron-core's scheduler state, counted in samples), and the
# flags that set each value.
SCHEDULE_FIELDS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--train-iters / --lr-decay-iters", "lr_decay_style": "--lr-decay-style",
    "wd_incr_steps": "--train-iters", "start_wd": "--weight-decay",
}


def schedule_changes(saved: dict, new: dict, global_batch_size: int) -> list[str]:
    """The scheduler values that differ between a checkpoint's and this run's state dicts, as '<flag>: <new> (the
    checkpoint has <saved>)'; step counts are shown in iterations of ``global_batch_size`` samples."""
    changes = []
    for key, flag in SCHEDULE_FIELDS.items():
        if key not in saved or key not in new or saved[key] == new[key]:
            continue
        old_value, new_value = saved[key], new[key]
        if key.endswith("_steps"):
            old_value, new_value = f"{old_value // global_batch_size} iterations", f"{new_value // global_batch_size}"
        changes.append(f"{flag} {new_value} (the checkpoint has {old_value})")
    return changes


def check_resumed_schedule(cfg: TrainConfig, saved: dict, scheduler) -> None:
    """Megatron-LM's rule: a resumed run keeps its LR schedule unless told which one wins."""
    if cfg.override_opt_param_scheduler or cfg.use_checkpoint_opt_param_scheduler:
        return
    changes = schedule_changes(saved, scheduler.state_dict(), cfg.global_batch_size)
    if changes:
        raise ConfigError(f"the resumed checkpoint's LR schedule differs: {'; '.join(changes)}. Pass "
                          "--override-opt_param-scheduler to use the new values or --use-checkpoint-opt_param-scheduler "
                          "to keep the checkpoint's")
