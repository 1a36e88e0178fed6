"""python -m megatron_patch.torchrun [torchrun flags] -m megatron_patch.train ...: torchrun, with readable failures.

The launch scripts start their ranks through this module instead of ``torchrun``. It runs torchrun's own launcher
(same flags, same rendezvous, same environment for the ranks) and changes only what the user sees:

- a rank that stops on a user error hands its one line to the launcher (errors.py), which prints the line
  of the first failing rank once and exits 1, instead of every rank printing it followed by torchrun's
  ``ChildFailedError`` traceback dump;
- a rank that crashes has printed its own traceback; the launcher adds one line naming the rank and exit code;
- a ``-m MODULE`` rank starts through ``runtime.rank_main``, which silences third-party warnings before MODULE
  imports megatron-core (unless ``MEGATRON_PATCH_VERBOSE=1``);
- torchrun's banners (``OMP_NUM_THREADS``, closing-signal warnings, the failure summary) are hidden unless
  ``MEGATRON_PATCH_VERBOSE=1``; OMP_NUM_THREADS defaults to 1 as under torchrun;
- SIGTERM (a scheduler's notice before preemption) is passed on to the ranks, which finish their iteration, save
  and exit 0 (training/signals.py), instead of torchrun's shutdown, which stops them and kills them after 30 s;
  Ctrl-C stops the ranks (each prints nothing but rank 0's one line) and exits 130 without torchrun's traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import psutil

from .errors import LAUNCHER_ENV, USER_ERROR_KEY
from .runtime.noise import is_verbose, quiet_third_party

RANK_MAIN = "megatron_patch.runtime.rank_main"


def first_failure_line(failures: dict) -> tuple[str, int]:
    """(one line for the user, exit code) from torchrun's ``{global rank: ProcessFailure}``.

    A rank's own user error wins over ranks torchrun stopped afterwards; among user errors the earliest. Otherwise
    the rank that ended first on its own (a crash, a kill) is named, not one torchrun stopped after it.
    """
    reported = []
    for rank, failure in failures.items():
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        if USER_ERROR_KEY in data:
            reported.append((int(data[USER_ERROR_KEY]), rank, str(data["message"])))
    if reported:
        _, rank, line = min(reported)
        same_everywhere = len({text for _, _, text in reported}) == 1
        return line if same_everywhere else f"{line} (rank {rank})", 1
    # Once a rank fails, torchrun stops the others with SIGTERM, often within the same second (its timestamps are whole
    # seconds): the rank that failed first is one that did not end by that SIGTERM, whatever its rank number.
    rank, failure = min(failures.items(),
                        key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))
    if failure.exitcode == 128 + signal.SIGINT:
        return "", failure.exitcode  # stopped by Ctrl-C: rank 0 has printed its one line
    if failure.exitcode < 0:
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "?"
        hint = " (out of host memory?)" if -failure.exitcode == signal.SIGKILL else ""
        return f"error: rank {rank} was killed by signal {name}{hint}", 1
    return f"error: rank {rank} exited with code {failure.exitcode} (its output is above)", failure.exitcode or 1


def _pass_on_to_ranks(signum, frame) -> None:
    """The launcher's SIGTERM handler: the ranks (its children that torchrun gave a LOCAL_RANK) receive the signal
    and decide when to stop. Other children are left alone: a launch script's log ``tee`` can be one."""
    for child in psutil.Process().children():
        try:
            if "LOCAL_RANK" in child.environ():
                child.send_signal(signum)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    verbose = is_verbose() or "--verbose" in argv  # the entry point's flag counts for the launcher too
    quiet_third_party(verbose)  # also tells the ranks, through the environment
    os.environ[LAUNCHER_ENV] = "1"
    # torchrun sets 1 for several ranks per node too, but announces it in a banner on every launch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not verbose:  # its failure summary is replaced by our line; its loggers each have their own level
        for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")  # torchrun's --signals-to-handle
    args = parse_args(argv)
    if args.module and not args.no_python:  # each rank quiet from its first import (runtime/rank_main.py)
        args.training_script_args = [args.training_script, *args.training_script_args]
        args.training_script = RANK_MAIN
    if "SIGTERM" not in args.signals_to_handle.split(","):
        signal.signal(signal.SIGTERM, _pass_on_to_ranks)
    try:
        run(args)
    except ChildFailedError as error:
        line, code = first_failure_line(error.failures)
        if line:
            print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as error:  # Ctrl-C: torchrun has stopped the ranks; rank 0 said where things stand
        return 128 + int(error.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
