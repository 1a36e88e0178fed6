"""How entry points report a user's mistake: one line on stderr and exit code 1, not a traceback.

Under ``python -m megatron_patch.torchrun`` (what the launch scripts use) a rank hands the line to the launcher
through torchrun's per-rank error file instead of printing it, and the launcher prints the first failing rank's
line once, in place of torchrun's ChildFailedError dump.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

LAUNCHER_ENV = "MEGATRON_PATCH_LAUNCHER"  # "1" in ranks started by megatron_patch.torchrun
USER_ERROR_KEY = "megatron_patch_user_error"  # marks our lines in torchrun's error files


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or a machine that cannot do the job (each carries an actionable message)."""
    from ..errors import CheckpointError
    from .launch import WorkerError
    from .versions import UnsupportedVersionError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, UnsupportedVersionError, WorkerError)


def run_reporting_errors(action: Callable[[], int | None], extra_errors: tuple = (), cleanup=None) -> int:
    """Run ``action``; return its exit code (0 for None), or 1 after printing a user error as one line."""
    try:
        code = action()
    except (*user_errors(), *extra_errors) as error:
        report_user_error(str(error))
        return 1
    finally:
        if cleanup is not None:
            cleanup()
    return 0 if code is None else int(code)


def report_user_error(message: str) -> None:
    """Print ``error: <message>`` on stderr; in a rank under torchrun also record it in the rank's error file.

    torchrun (TORCHELASTIC_ERROR_FILE) reads a ``{"message": str, "timestamp": int}`` file; the extra key lets
    megatron_patch.torchrun tell our one-line errors from crashes and order ranks by the moment they failed.
    """
    line = f"error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": line, "timestamp": int(time.time()), USER_ERROR_KEY: time.time_ns()}
        try:
            with open(error_file, "w") as handle:
                json.dump(record, handle)
        except OSError:
            error_file = None  # the launcher cannot see it: print instead
    if not (error_file and os.environ.get(LAUNCHER_ENV) == "1"):
        print(line, file=sys.stderr)
