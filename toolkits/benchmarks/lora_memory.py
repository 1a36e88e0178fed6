"""Trainable parameters and memory of full training against LoRA, side by side (each in its own process).

    python toolkits/benchmarks/lora_memory.py --hf DIR [--lora-rank 8] [--steps 5] [--seq-length 128]

Converts ``--hf`` once, then trains a few pretraining steps on the corpus the repo ships with every parameter and
with LoRA adapters (``--lora-rank``, all four targets), one rank each, and prints per side: parameters, trainable
parameters, the optimizer's state (bytes of its tensors), the gradient buffer (megatron-core DDP) and the peak memory
(CUDA: max allocated; CPU: max RSS of the process, which includes torch and megatron-core themselves).
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


def measure(args) -> dict:
    import resource

    import torch

    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.loop import build_trainer, train

    cfg = TrainConfig(mode="pretrain", load=args.load, data_path=[args.data], split="100,0,0",
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size,
                      seq_length=args.seq_length, train_iters=args.steps, lr=1e-4, lora_rank=args.lora_rank,
                      bf16=args.bf16, seed=1)
    trainer = build_trainer(cfg, quiet=True)
    train(trainer)
    trainer.logger.close()
    module = trainer.trained.model.module
    optimizers = getattr(trainer.trained.optimizer, "chained_optimizers", [trainer.trained.optimizer])
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers for state in opt.optimizer.state.values()
                      for t in state.values() if isinstance(t, torch.Tensor))
    grad_bytes = sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                     for buffer in trainer.trained.model.buffers + trainer.trained.model.expert_parallel_buffers)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"parameters": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "optimizer_state_bytes": state_bytes, "grad_buffer_bytes": grad_bytes, "peak_bytes": peak,
            "final_loss": trainer.history[-1][1]}


def run_side(args, work: Path, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--_side", "--load", str(work / "mcore"), "--data", str(work / "corpus_text_document"),
           "--lora-rank", str(rank), "--steps", str(args.steps), "--seq-length", str(args.seq_length),
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

    work = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    hf_to_mcore(args.hf, work / "mcore")
    with open(work / "corpus.jsonl", "w") as handle:
        for line in CORPUS.read_text().splitlines():
            if line.strip():
                handle.write(json.dumps({"text": line}) + "\n")
    build_indexed_dataset(work / "corpus.jsonl", work / "corpus_text_document", args.hf, progress=False)
    sides = {"full": run_side(args, work, 0), f"LoRA rank {args.lora_rank}": run_side(args, work, args.lora_rank)}
    print("| training | parameters | trainable | optimizer state | gradient buffer | peak memory | loss after "
          f"{args.steps} steps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in sides.items():
        print(f"| {name} | {r['parameters']:,} | {r['trainable']:,} ({100 * r['trainable'] / r['parameters']:.2f}%) | "
              f"{r['optimizer_state_bytes'] / MIB:.2f} MiB | {r['grad_buffer_bytes'] / MIB:.2f} MiB | "
              f"{r['peak_bytes'] / MIB:.0f} MiB | {r['final_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
