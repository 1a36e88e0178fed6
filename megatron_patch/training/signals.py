"""SIGTERM and Ctrl-C in a training run, handled as Megatron-LM's ``--exit-signal-handler`` handles them.

SIGTERM (what a cluster scheduler sends before it preempts a job) is only recorded when it arrives; at the end of
the iteration the ranks agree whether any of them received it (one all-reduce of a flag, as Megatron-LM's
``DistributedSignalHandler`` gathers its flags), save a checkpoint together and exit 0 with one line saying where
it is and how to resume. SIGINT (Ctrl-C) stops at once: rank 0 prints one line naming the last saved iteration, the
process exits 130 without a traceback. A second signal while stopping changes nothing (torchrun forwards the
signal to the ranks that already received it from the terminal).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from ..errors import INTERRUPTED_EXIT_CODE
from ..runtime.device import local_device


class StopSignals:
    """Records SIGTERM / SIGINT for the training loop while installed (``with StopSignals() as signals:``)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a run in a thread keeps the defaults
        for sig in self.HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return  # already stopping
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def interrupted(self) -> bool:
        return self.received == signal.SIGINT

    def terminate_requested(self) -> bool:
        """Whether any rank received SIGTERM (collective over every rank: call it at the same point everywhere)."""
        flag = torch.tensor([1 if self.received == signal.SIGTERM else 0], dtype=torch.int32, device=local_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def is_rank_zero() -> bool:
    return dist.get_rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"


def last_saved_text(last_saved: tuple[int, str] | None) -> str:
    if last_saved is None:
        return "no checkpoint of this run was saved"
    iteration, save = last_saved
    return f"the last checkpoint is iteration {iteration} in {save} (run the same command again to resume from it)"


def interrupted_line(iteration: int | None, last_saved: tuple[int, str] | None) -> str:
    where = "before training started" if iteration is None else f"during iteration {iteration + 1}"
    return f"interrupted (Ctrl-C) {where}: {last_saved_text(last_saved)}"


def terminated_line(iteration: int, save: str | None, path) -> str:
    if path is None:
        return (f"stopped by SIGTERM after iteration {iteration}: nothing saved (no --save); "
                "pass --save to make a stopped run resumable")
    return (f"stopped by SIGTERM after iteration {iteration}: saved {path}; run the same command again (or --load "
            f"{save}) to resume at iteration {iteration}")


def report_interrupted(iteration: int | None, last_saved: tuple[int, str] | None) -> None:
    """Rank 0's one line for Ctrl-C, then exit 130 on every rank (SystemExit: no traceback, cleanup still runs)."""
    if is_rank_zero():
        print(interrupted_line(iteration, last_saved), file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_EXIT_CODE)
