"""python -m megatron_patch.train {pretrain,finetune,check} [Megatron-LM flags]

Launch with torchrun for several processes (NCCL on GPUs, gloo on a CPU machine), e.g.
  torchrun --nproc-per-node 2 -m megatron_patch.train pretrain --tensor-model-parallel-size 2 --load CKPT ...
(the launch scripts use python -m megatron_patch.torchrun, which prints a failing rank's error once).
`check MODE ...` runs the cheap checks of MODE in one process, before any rank starts.
"""

from __future__ import annotations

import argparse
import os
import sys

MODES = {
    "pretrain": "pretrain on indexed datasets (--data-path)",
    "finetune": "supervised finetuning on jsonl (--train-data-path)",
}
SFT_SCHEMA_HELP = """\
SFT data (--train-data-path, --valid-data-path): jsonl, one sample per line, either
  {"instruction": "...", "input": "... (optional)", "output": "..."}
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
The loss covers the response only (output / assistant turns, with the closing EOS)."""


def size_presets_help() -> str:
    from .models import get_family, supported_families

    lines = ["size presets (--model-size), per family:"]
    lines += [f"  {name}: {', '.join(get_family(name).flavors)}" for name in supported_families()]
    return "\n".join(lines)


def _add_mode_parser(sub, mode: str, check: bool = False) -> None:
    from .runtime.noise import add_verbose_flag
    from .training.arguments import add_config_arguments

    epilog = size_presets_help() + ("\n\n" + SFT_SCHEMA_HELP if mode == "finetune" else "")
    parser = sub.add_parser(mode, help=MODES[mode], description=MODES[mode], epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, mode)
    add_verbose_flag(parser)
    if check:
        parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                            help="processes the launch will start (default: $WORLD_SIZE or 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in MODES:
        _add_mode_parser(sub, mode)
    check = sub.add_parser("check", help="the checks a launch runs before starting ranks (no model is built)")
    check_sub = check.add_subparsers(dest="check_mode", required=True)
    for mode in MODES:
        _add_mode_parser(check_sub, mode, check=True)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.noise import quiet_third_party

    quiet_third_party(args.verbose or None)
    from .errors import run_reporting_errors
    from .training.arguments import config_from_args
    from .training.entry import train_reporting

    if args.mode == "check":
        from .training.preflight import preflight

        return run_reporting_errors(lambda: preflight(config_from_args(args, args.check_mode), args.world_size))

    def train(cfg) -> None:
        from .training.loop import run

        run(cfg)

    return train_reporting(lambda: config_from_args(args, args.mode), train)


if __name__ == "__main__":
    sys.exit(main())
