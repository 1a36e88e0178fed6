"""Training and preprocessing throughput of megatron-patch against plain baselines, measured side by side.

Training: the toolkit's train_step (megatron-core GPTModel, megatron-core DDP + optimizer, pipeline schedule, grad
clipping) against a plain PyTorch loop over transformers' LlamaForCausalLM of the same shape, batch, sequence length,
dtype and optimizer (Adam, same betas/eps/weight decay, grad clipping 1.0). Each side runs in its own fresh process
(the CPU path's function mode would otherwise tax the baseline too), alternating A, B, A, B for --rounds rounds;
the medians are compared.

Preprocessing: jsonl -> indexed dataset (tokenize + EOD + write) against the bare tokenizer encoding the same
documents in one loop.

    python toolkits/benchmarks/train_throughput.py [--layers 4 --hidden 256 --seq-length 256 --micro-batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def hf_config(args) -> dict:
    from megatron_patch.models import get_family

    cfg = get_family("llama").flavor("tiny")
    cfg.update(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
               num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
               max_position_embeddings=max(512, args.seq_length))
    return cfg


def batches(args, n):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_length + 1), generator=gen) for _ in range(n)]


def measure_hf(args) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config(args))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    data = batches(args, args.warmup + args.steps)

    def step(sample):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=sample[:, :-1], labels=sample[:, :-1])  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for sample in data[: args.warmup]:
        step(sample)
    start = time.perf_counter()
    for sample in data[args.warmup:]:
        step(sample)
    return args.steps * args.micro_batch_size * args.seq_length / (time.perf_counter() - start)


def measure_toolkit(args) -> float:
    import torch

    from megatron_patch.models.spec import ModelSpec
    from megatron_patch.runtime import init_distributed
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.checkpointing import TrainerState
    from megatron_patch.training.logging import MetricsLogger
    from megatron_patch.training.loop import Trainer, train_step
    from megatron_patch.training.setup import (
        ModelSource,
        build_ddp_model,
        build_optimizer,
        build_scheduler,
        build_transformer_config,
    )

    spec = ModelSpec.from_hf_config(hf_config(args), tp=1, family="llama", make_vocab_size_divisible_by=128)
    cfg = TrainConfig(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="-", data_path=["-"],
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
                      seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=1e-4, min_lr=1e-4,
                      lr_decay_style="constant", weight_decay=0.01, clip_grad=1.0).validate(1)
    init_distributed(1, 1, seed=0)
    source = ModelSource(spec, None, None)
    config = build_transformer_config(cfg, source)
    model = build_ddp_model(cfg, source, config)
    optimizer = build_optimizer(cfg, model)
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func, config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    scheduler = build_scheduler(cfg, optimizer, cfg.train_iters)
    logger = MetricsLogger(1, None, 0, quiet=True)
    t = Trainer(cfg, model, optimizer, scheduler, source, TrainerState(), None, None, cfg.train_iters,
                args.seq_length, logger)
    positions = torch.arange(args.seq_length).unsqueeze(0).expand(args.micro_batch_size, -1)
    data = [{"tokens": s[:, :-1], "labels": s[:, 1:], "loss_mask": torch.ones(args.micro_batch_size, args.seq_length),
             "position_ids": positions} for s in batches(args, args.warmup + args.steps)]
    iterator = iter(data)
    for _ in range(args.warmup):
        train_step(t, iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(t, iterator)
    return args.steps * args.micro_batch_size * args.seq_length / (time.perf_counter() - start)


def run_side(side: str, args) -> float:
    cmd = [sys.executable, __file__, "--_side", side] + [a for a in sys.argv[1:] if not a.startswith("--_side")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
    return float(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])


def preprocessing(args) -> tuple[float, dict[int, float]]:
    from megatron_patch.data.indexed import build_indexed_dataset
    from megatron_patch.data.tokenizers import load_tokenizer
    from megatron_patch.models.tiny import CORPUS, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    train_tokenizer(work / "tok", vocab_size=512)
    texts = [line for line in CORPUS.read_text().splitlines() if line.strip()] * args.corpus_repeat
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(work / "tok")
    start = time.perf_counter()
    tokens = sum(len(tok.encode(t)) + 1 for t in texts)
    bare = tokens / (time.perf_counter() - start)
    ours = {}
    for workers in (1, 2):
        summary = build_indexed_dataset(work / "docs.jsonl", work / f"out{workers}", work / "tok", workers=workers,
                                        chunk_lines=256, progress=False)
        assert summary.tokens == tokens
        ours[workers] = summary.tokens_per_second
    return bare, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus-repeat", type=int, default=100)
    parser.add_argument("--skip-preprocessing", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--_side", choices=("hf", "toolkit"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._side:
        rate = measure_hf(args) if args._side == "hf" else measure_toolkit(args)
        print(json.dumps({"tokens_per_s": rate}))
        return 0

    print(f"shape: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"batch {args.micro_batch_size} x seq {args.seq_length}; fp32; Adam; {args.steps} timed steps per round")
    hf_rates, tk_rates = [], []
    for r in range(0 if args.skip_training else args.rounds):
        hf_rates.append(run_side("hf", args))
        tk_rates.append(run_side("toolkit", args))
        print(f"round {r + 1}: transformers+torch loop {hf_rates[-1]:,.0f} tokens/s | "
              f"megatron-patch {tk_rates[-1]:,.0f} tokens/s", flush=True)
    # A shared machine makes single rounds noisy: report the median of the per-round ratios (each from adjacent
    # runs) and the ratio of the best rounds.
    ratios = [tk / hf for tk, hf in zip(tk_rates, hf_rates)]
    if ratios:
        print(f"training tokens/s, megatron-patch / plain PyTorch + LlamaForCausalLM: median per-round ratio "
              f"{statistics.median(ratios):.2f}; best {max(tk_rates):,.0f} vs {max(hf_rates):,.0f} -> "
              f"ratio {max(tk_rates) / max(hf_rates):.2f}")
    if not args.skip_preprocessing:
        bare, ours = preprocessing(args)
        for workers, rate in ours.items():
            print(f"preprocessing tokens/s with {workers} worker(s): {rate:,.0f} vs bare tokenizer {bare:,.0f} "
                  f"-> ratio {rate / bare:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
