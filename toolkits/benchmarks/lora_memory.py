"""Trainable parameters and memory of full training against LoRA, side by side (each in its own process).

    python toolkits/benchmarks/lora_memory.py --hf DIR [--trainer pretrain|dpo|grpo] [--lora-rank 8] [--steps 5]
        [--seq-length 128]

Converts ``--hf`` once, then trains a few steps with every parameter and with LoRA adapters (``--lora-rank``, all
four targets), one rank each: pretraining on the corpus the repo ships, DPO on the toy preference pairs
(``rlhf.examples.toy``), or GRPO on digit prompts (2 samples each, 4 new tokens). Prints per side: parameters of
every model the run holds (DPO / GRPO: the policy and, without LoRA, the reference; with LoRA the reference is the
policy with its adapters off), their bytes, trainable parameters, the optimizer's state (bytes of its tensors), the
gradient buffer (megatron-core DDP) and the peak memory (CUDA: max allocated; CPU: max RSS of the process, which
includes torch and megatron-core themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
DATA = {"pretrain": "corpus_text_document", "dpo": "toy/train.jsonl", "grpo": "prompts.jsonl"}


def _pretrain(args, common: dict):
    """(DDP model, optimizer, other models held, final loss) of a few pretraining steps."""
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.loop import build_trainer, train

    cfg = TrainConfig(mode="pretrain", data_path=[args.data], split="100,0,0", **common)
    trainer = build_trainer(cfg, quiet=True)
    train(trainer)
    trainer.logger.close()
    return trainer.trained.model, trainer.trained.optimizer, [], trainer.history[-1][1]


def _dpo(args, common: dict):
    from megatron_patch.rlhf.preference.dpo import build_run
    from megatron_patch.rlhf.preference.trainer import train_to_end
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig(mode="finetune", train_data_path=args.data, **common)
    run = build_run(cfg, beta=0.1, quiet=True)
    out = train_to_end(run)
    return run.trained.model, run.trained.optimizer, [run.frozen], out["history"][-1][1]["loss"]


def _grpo(args, common: dict):
    from megatron_patch.rlhf.ppo.config import RLConfig
    from megatron_patch.rlhf.ppo.loop import train
    from megatron_patch.rlhf.ppo.setup import build_run
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig(mode="finetune", **common)
    rl = RLConfig(algo="grpo", prompt_data_path=args.data, reward="digits", max_new_tokens=4, n_samples_per_prompt=2)
    run = build_run(cfg, rl, quiet=True)
    try:
        train(run)
    finally:
        run.logger.close()
    return run.actor.model, run.actor.optimizer, [run.reference], run.history[-1][1]["reward/mean"]


TRAINERS = {"pretrain": _pretrain, "dpo": _dpo, "grpo": _grpo}


def measure(args) -> dict:
    import resource

    import torch

    common = dict(load=args.load, micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
                  seq_length=args.seq_length, train_iters=args.steps, lr=1e-4, lora_rank=args.lora_rank,
                  bf16=args.bf16, seed=1)
    model, optimizer, others, final_loss = TRAINERS[args.trainer](args, common)
    module = model.module
    # A LoRA reference (rlhf.roles.BaseOfActor) is the policy's own stage: no parameters of its own.
    held = [module] + [m for m in others if isinstance(m, torch.nn.Module)]
    params = [p for m in held for p in m.parameters()]
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers for state in opt.optimizer.state.values()
                      for t in state.values() if isinstance(t, torch.Tensor))
    grad_bytes = sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                     for buffer in model.buffers + model.expert_parallel_buffers)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"models": len(held), "parameters": sum(p.numel() for p in params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "optimizer_state_bytes": state_bytes, "grad_buffer_bytes": grad_bytes, "peak_bytes": peak,
            "final_loss": final_loss}


def run_side(args, work: Path, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--_side", "--load", str(work / "mcore"), "--data", str(work / DATA[args.trainer]),
           "--trainer", args.trainer, "--lora-rank", str(rank), "--steps", str(args.steps),
           "--seq-length", str(args.seq_length),
           "--micro-batch-size", str(args.micro_batch_size)] + (["--bf16"] if args.bf16 else [])
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"the side with --lora-rank {rank} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", help="HF model directory (with its tokenizer)")
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="pretrain")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--_side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._side:
        print(json.dumps(measure(args)))
        return 0
    if not args.hf:
        parser.error("--hf is required")
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.data.indexed import build_indexed_dataset
    from megatron_patch.models.tiny import CORPUS
    from megatron_patch.rlhf.examples.toy import write_toy_preferences

    work = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    hf_to_mcore(args.hf, work / "mcore")
    if args.trainer == "pretrain":
        with open(work / "corpus.jsonl", "w") as handle:
            for line in CORPUS.read_text().splitlines():
                if line.strip():
                    handle.write(json.dumps({"text": line}) + "\n")
        build_indexed_dataset(work / "corpus.jsonl", work / DATA["pretrain"], args.hf, progress=False)
    elif args.trainer == "dpo":
        write_toy_preferences(work / "toy")
    else:
        (work / DATA["grpo"]).write_text("".join(json.dumps({"prompt": f"{d}{(d + 1) % 10}{(d + 2) % 10}"}) + "\n"
                                                 for d in range(10)))
    sides = {"full": run_side(args, work, 0), f"LoRA rank {args.lora_rank}": run_side(args, work, args.lora_rank)}
    print(f"| {args.trainer} | models held | parameters (bytes) | trainable | optimizer state | gradient buffer | "
          f"parameters + gradients + optimizer | peak memory | last {'reward' if args.trainer == 'grpo' else 'loss'} "
          f"after {args.steps} steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in sides.items():
        total = r["parameter_bytes"] + r["grad_buffer_bytes"] + r["optimizer_state_bytes"]
        print(f"| {name} | {r['models']} | {r['parameters']:,} ({r['parameter_bytes'] / MIB:.2f} MiB) | "
              f"{r['trainable']:,} ({100 * r['trainable'] / r['parameters']:.2f}%) | "
              f"{r['optimizer_state_bytes'] / MIB:.2f} MiB | {r['grad_buffer_bytes'] / MIB:.2f} MiB | "
              f"{total / MIB:.2f} MiB | {r['peak_bytes'] / MIB:.0f} MiB | {r['final_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
