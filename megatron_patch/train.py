"""python -m megatron_patch.train {pretrain,finetune} [Megatron-LM flags]

Launch with torchrun for several processes (NCCL on GPUs, gloo on a CPU machine), e.g.
  torchrun --nproc-per-node 2 -m megatron_patch.train pretrain --tensor-model-parallel-size 2 --load CKPT ...
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .training.arguments import add_config_arguments

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, text in (("pretrain", "pretrain on indexed datasets (--data-path)"),
                       ("finetune", "supervised finetuning on jsonl (--train-data-path)")):
        add_config_arguments(sub.add_parser(mode, help=text))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import destroy_distributed
    from .runtime.errors import run_reporting_errors
    from .training.arguments import config_from_args
    from .training.loop import run
    from .training.setup import MachineSupportError

    def train() -> None:
        run(config_from_args(args, args.mode))

    return run_reporting_errors(train, extra_errors=(MachineSupportError,), cleanup=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
