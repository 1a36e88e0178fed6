"""Loss-curve alignment: megatron-patch's training against a plain PyTorch loop over transformers' model.

    python toolkits/benchmarks/hf_alignment.py --hf DIR [--tp T --pp P] [--mode pretrain|sft] [--steps N]

1. converts ``--hf`` with hf2mcore at TP x PP;
2. trains it with the real entry point (``python -m megatron_patch.torchrun ... -m megatron_patch.train``: the
   megatron-core pipeline schedule, DDP, optimizer and LR scheduler), parsing the per-step ``lm loss`` of its log;
3. trains transformers' model (``AutoModelForCausalLM``, loaded from ``--hf``) in a plain loop on exactly the same
   micro-batches in the same order (read with the toolkit's own dataset builder and micro-batch order, so both sides
   see the same token ids): ``torch.optim.AdamW`` with the same betas/eps, weight decay on every parameter except
   biases and 1-D tensors (norms), ``torch.nn.utils.clip_grad_norm_``, transformers' warmup + cosine/linear/constant
   schedule, transformers' own label shift (``labels=`` with -100 outside the loss mask, ``input_ids`` one token
   longer) and loss;
4. converts ours back with mcore2hf and compares the final weights with the loop's.

The gradient of a global batch of several micro-batches follows Megatron-LM: the mean over micro-batches of each
micro-batch's token-mean loss (``--calculate-per-token-loss``: the token mean over the whole global batch instead,
what transformers' Trainer does with ``num_items_in_batch``). The loop mirrors whichever is chosen; the logged loss
is the token-weighted mean of the global batch on both sides.

Last line: ``max relative loss difference <x> over <n> steps``. Exit 1 when it is above ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: ([0-9.E+\-naif]+) \|")


# --- our side: the real entry point ------------------------------------------------------------------------------


def train_flags(args, mode_data: list[str], save: Path, load: Path) -> list[str]:
    flags = [
        "--load", str(load), "--save", str(save),
        "--tensor-model-parallel-size", str(args.tp), "--pipeline-model-parallel-size", str(args.pp),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--seq-length", str(args.seq_length), "--train-iters", str(args.steps),
        "--lr", str(args.lr), "--min-lr", str(args.min_lr), "--lr-decay-style", args.lr_decay_style,
        "--lr-warmup-iters", str(args.lr_warmup_iters), "--weight-decay", str(args.weight_decay),
        "--adam-beta1", str(args.adam_beta1), "--adam-beta2", str(args.adam_beta2), "--adam-eps", str(args.adam_eps),
        "--clip-grad", str(args.clip_grad), "--log-interval", "1", "--seed", str(args.seed), "--finetune",
        *mode_data,
    ]
    if args.calculate_per_token_loss:
        flags.append("--calculate-per-token-loss")
    return flags


def run_ours(args, mode_data: list[str], work: Path, load: Path) -> dict[int, float]:
    save = work / "ours"
    cmd = [sys.executable, "-m", "megatron_patch.torchrun", "--nproc-per-node", str(args.tp * args.pp),
           "-m", "megatron_patch.train", "pretrain" if args.mode == "pretrain" else "finetune",
           *train_flags(args, mode_data, save, load)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"megatron-patch training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    losses = {int(m.group(1)): float(m.group(2)) for m in LOSS_LINE.finditer(proc.stdout)}
    if sorted(losses) != list(range(1, args.steps + 1)):
        raise SystemExit(f"expected a loss for each of {args.steps} steps in the log, got {sorted(losses)}")
    return losses


# --- the transformers side: a plain loop -------------------------------------------------------------------------


def training_batches(args, work: Path, mode_data: list[str], hf_dir: str) -> list[list[dict]]:
    """Each step's micro-batches, in the order the toolkit's run consumed them (data parallel size 1 reads the
    same global batches in the same order as any other)."""
    from megatron_patch.data.loader import MicroBatchIterator
    from megatron_patch.data.tokenizers import load_tokenizer
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.loop import build_data

    data = dict(zip(mode_data[::2], mode_data[1::2]))
    cfg = TrainConfig(mode="pretrain" if args.mode == "pretrain" else "finetune", load=hf_dir,
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                      seq_length=args.seq_length, train_iters=args.steps, seed=args.seed,
                      data_path=[data["--data-path"]] if "--data-path" in data else None,
                      split=data.get("--split", "99,1,0"), data_cache_path=str(work / "ours" / "data_cache"),
                      train_data_path=data.get("--train-data-path"))
    train_data, _, _, _ = build_data(cfg, load_tokenizer(hf_dir))
    iterator = MicroBatchIterator(train_data, args.micro_batch_size, 1, 0)
    per_step = args.global_batch_size // args.micro_batch_size
    return [[next(iterator) for _ in range(per_step)] for _ in range(args.steps)]


def hf_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) as a transformers user writes them: the whole sequence as ``input_ids`` (our tokens and
    the last label), ``labels`` the same ids with -100 where the loss is masked; transformers shifts them itself."""
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"].bool()
    input_ids = torch.cat([tokens, labels[:, -1:]], dim=1)
    hf_labels = torch.full_like(input_ids, -100)
    hf_labels[:, 1:] = torch.where(mask, labels, torch.full_like(labels, -100))
    # Before a row's last loss position every label must be the next input (what transformers' shift assumes);
    # after it (padding) the inputs cannot reach a counted loss through causal attention.
    later_loss = mask.flip(1).cummax(1).values.flip(1)[:, 1:]  # [i]: is any position > i counted?
    if not torch.equal(tokens[:, 1:][later_loss], labels[:, :-1][later_loss]):
        raise SystemExit("the batch's labels are not its tokens shifted by one (packed data?): use unpacked data")
    return input_ids, hf_labels


def decay_groups(model) -> list[dict]:
    """AdamW groups: weight decay on every parameter except biases and 1-D tensors (norm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(args, optimizer):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if args.lr_decay_style == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.lr_warmup_iters, args.steps,
                                                           min_lr=args.min_lr)
    if args.lr_decay_style == "linear":
        return get_linear_schedule_with_warmup(optimizer, args.lr_warmup_iters, args.steps)
    return get_constant_schedule_with_warmup(optimizer, args.lr_warmup_iters)


def load_hf_model(hf_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True,
                                                attn_implementation="eager")


def transformers_view(hf_dir: str, work: Path) -> tuple[str, object]:
    """(a directory transformers loads without remote code, a function mapping its state dict back to ``hf_dir``'s
    names). Most families load as they are. Baichuan-7B (RoPE, no NormHead) has no transformers class: it is
    llama with q, k, v fused into ``W_pack``, so the loop trains ``LlamaForCausalLM`` on the split weights (the
    13B's ALiBi and Baichuan2's NormHead have no transformers equivalent and are refused)."""
    from safetensors.torch import load_file, save_file

    from megatron_patch.checkpoint.hf import copy_assets, read_config
    from megatron_patch.models.spec import ModelSpec

    config = read_config(hf_dir)
    if config.get("model_type") != "baichuan":
        return hf_dir, lambda state: state
    arch = ModelSpec.from_hf_config(config, tp=1).arch
    if arch.position_embedding != "rope" or arch.norm_head:
        raise SystemExit("Baichuan-13B (ALiBi) and Baichuan2 (NormHead) have no transformers class to compare with")
    view = work / "llama_view"
    view.mkdir(parents=True, exist_ok=True)
    copy_assets(hf_dir, view)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config["hidden_size"],
             "intermediate_size": config["intermediate_size"], "num_hidden_layers": config["num_hidden_layers"],
             "num_attention_heads": config["num_attention_heads"],
             "num_key_value_heads": config["num_attention_heads"], "vocab_size": config["vocab_size"],
             "rms_norm_eps": config["rms_norm_eps"], "max_position_embeddings": config["max_position_embeddings"],
             "rope_theta": arch.rope_theta, "tie_word_embeddings": False, "hidden_act": "silu",
             **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}}
    (view / "config.json").write_text(json.dumps(llama, indent=2) + "\n")
    tensors = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name.endswith("self_attn.W_pack.weight"):
                stem = name.removesuffix("W_pack.weight")
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    tensors[f"{stem}{part}.weight"] = piece.contiguous()
            else:
                tensors[name] = tensor
    save_file(tensors, str(view / "model.safetensors"), metadata={"format": "pt"})

    def back(state: dict) -> dict:
        out = {}
        for name, tensor in state.items():
            if name.endswith("self_attn.q_proj.weight"):
                stem = name.removesuffix("q_proj.weight")
                parts = [state[f"{stem}{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{stem}W_pack.weight"] = torch.cat(parts, dim=0)
            elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                out[name] = tensor
        return out

    return str(view), back


def run_transformers(args, steps: list[list[dict]], hf_dir: str):
    """Per-step losses (token-weighted mean of the global batch) and the trained model."""
    torch.manual_seed(args.seed)
    model = load_hf_model(hf_dir)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_eps, weight_decay=args.weight_decay, foreach=False)
    scheduler = lr_schedule(args, optimizer)
    losses = {}
    for step, micro_batches in enumerate(steps, start=1):
        optimizer.zero_grad(set_to_none=True)
        inputs = [hf_inputs(batch) for batch in micro_batches]
        total_tokens = sum(int((labels != -100).sum()) for _, labels in inputs)
        loss_sum = 0.0
        for input_ids, labels in inputs:
            tokens = int((labels != -100).sum())
            if args.calculate_per_token_loss:  # transformers' Trainer: num_items_in_batch = the global batch's tokens
                out = model(input_ids=input_ids, labels=labels, num_items_in_batch=total_tokens)
                out.loss.backward()
                loss_sum += float(out.loss.detach()) * total_tokens
            else:  # Megatron-LM: each micro-batch's token mean, averaged over the micro-batches
                out = model(input_ids=input_ids, labels=labels)
                (out.loss / len(inputs)).backward()
                loss_sum += float(out.loss.detach()) * tokens
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        scheduler.step()
        losses[step] = loss_sum / max(total_tokens, 1)
    return losses, model


# --- comparison ----------------------------------------------------------------------------------------------------


def weight_difference(ours_hf: Path, theirs: dict) -> tuple[float, str]:
    from safetensors.torch import load_file

    worst, where = 0.0, ""
    for shard in sorted(ours_hf.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name not in theirs:
                raise SystemExit(f"mcore2hf wrote {name}, which transformers' model does not have")
            diff = float((tensor.float() - theirs[name].float()).abs().max())
            if diff > worst:
                worst, where = diff, name
    return worst, where


def prepare_data(args, work: Path, hf_dir: str) -> list[str]:
    from megatron_patch.data.indexed import build_indexed_dataset
    from megatron_patch.data.sft import write_demo_sft
    from megatron_patch.models.tiny import CORPUS

    if args.mode == "sft":
        path = args.data or write_demo_sft(CORPUS, work / "sft.jsonl")
        return ["--train-data-path", str(path)]
    if args.data:
        return ["--data-path", args.data, "--split", "100,0,0"]
    jsonl = work / "corpus.jsonl"
    with open(jsonl, "w") as handle:
        for line in CORPUS.read_text().splitlines():
            if line.strip():
                handle.write(json.dumps({"text": line}) + "\n")
    prefix = work / "corpus_text_document"
    build_indexed_dataset(jsonl, prefix, hf_dir, progress=False, overwrite=True)
    return ["--data-path", str(prefix), "--split", "100,0,0"]


def align(args) -> float:
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.convert.mcore_to_hf import mcore_to_hf

    work = Path(args.work or tempfile.mkdtemp(prefix="hf_alignment_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = str(args.hf)
    hf_to_mcore(hf_dir, work / "mcore", tp=args.tp, pp=args.pp, overwrite=True)
    mode_data = prepare_data(args, work, hf_dir)
    ours = run_ours(args, mode_data, work, work / "mcore")
    steps = training_batches(args, work, mode_data, hf_dir)
    view, names_back = transformers_view(hf_dir, work)
    theirs, model = run_transformers(args, steps, view)

    print(f"{'step':>5} | {'megatron-patch':>14} | {'transformers':>14} | {'abs diff':>9} | {'rel diff':>9}")
    worst_abs = worst_rel = 0.0
    for step in range(1, args.steps + 1):
        a, b = ours[step], theirs[step]
        diff = abs(a - b)
        rel = diff / abs(b) if b else math.inf
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
        print(f"{step:5d} | {a:14.7f} | {b:14.7f} | {diff:9.2e} | {rel:9.2e}")
    mcore_to_hf(work / "ours", work / "ours_hf", overwrite=True)
    weight_diff, where = weight_difference(work / "ours_hf", names_back(model.state_dict()))
    print(f"final weights (ours converted back vs transformers' loop): max abs difference {weight_diff:.3e} ({where})")
    print(f"max abs loss difference {worst_abs:.3e}")
    print(f"max relative loss difference {worst_rel:.3e} over {args.steps} steps")
    return worst_rel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (with its tokenizer)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--mode", choices=("pretrain", "sft"), default="pretrain")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", default=None, help="pretrain: an indexed dataset prefix; sft: a jsonl "
                        "(default: built from the corpus the repo ships)")
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    parser.add_argument("--lr-warmup-iters", type=int, default=None, help="default: a tenth of --steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.95)
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--calculate-per-token-loss", action="store_true",
                        help="token mean over the global batch (default: Megatron-LM's mean of micro-batch means)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative loss difference allowed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds our training may run")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = args.steps // 10
    if args.lr_decay_style == "linear" and args.min_lr:
        raise SystemExit("--lr-decay-style linear: transformers' linear schedule decays to 0; pass --min-lr 0")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    worst = align(args)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
