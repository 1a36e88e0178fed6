"""What every training entry point does around its work: pretraining / SFT (``megatron_patch.train``), the reward
model, DPO and PPO / GRPO (``megatron_patch.rlhf...``).

Third-party warnings off unless ``--verbose``; the environment notes once (rank 0); a collective that times out
after ``--distributed-timeout-minutes`` (a frozen or stopped rank) ends the run with one line naming the silent
rank; user errors as one line; process groups torn down however the run ends. ``--check`` (with ``--world-size``)
runs the entry point's cheap checks in one process instead, as the launch scripts do before torchrun starts any
rank (``python -m megatron_patch.train check`` for pretraining and SFT).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from ..errors import run_reporting_errors
from ..runtime import destroy_distributed
from ..runtime.distributed import collective_timeouts_reported
from ..runtime.noise import add_verbose_flag, environment_notes, quiet_third_party
from .arguments import TrainConfig


def add_entry_arguments(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, and ``--check`` / ``--world-size`` for the launch scripts' pre-flight."""
    add_verbose_flag(parser)
    parser.add_argument("--check", action="store_true",
                        help="run the checks a launch runs before starting ranks (flags, checkpoint, data, reward), "
                             "in this process and without building a model, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the processes the launch will start (default: $WORLD_SIZE or 1)")


def train_reporting(make_cfg: Callable[[], TrainConfig], work: Callable[[TrainConfig], object]) -> int:
    """Run ``work(make_cfg())`` as a training rank: notes on rank 0, collective timeouts as one line, errors as one
    line, process groups torn down; returns the exit code."""

    def action() -> None:
        cfg = make_cfg()
        if os.environ.get("RANK", "0") == "0":
            for note in environment_notes(cfg.transformer_impl):
                print(f"note: {note}", flush=True)
        with collective_timeouts_reported(cfg.distributed_timeout_minutes):  # a frozen rank: one line, not a hang
            work(cfg)

    return run_reporting_errors(action, cleanup=destroy_distributed)


def run_entry(args: argparse.Namespace, make_cfg: Callable[[], TrainConfig],
              work: Callable[[TrainConfig], object], check: Callable[[TrainConfig, int], object]) -> int:
    """An entry point made with ``add_entry_arguments``: ``check(cfg, world_size)`` under ``--check``, else
    ``work(cfg)`` as a training rank (``train_reporting``)."""
    quiet_third_party(args.verbose or None)
    if args.check:
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        return run_reporting_errors(lambda: check(make_cfg(), world_size) and None)
    return train_reporting(make_cfg, work)
