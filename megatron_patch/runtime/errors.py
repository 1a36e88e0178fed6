"""How entry points report a user's mistake: one line on stderr and exit code 1, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or a machine that cannot do the job (each carries an actionable message)."""
    from ..convert.hf_io import CheckpointError
    from .launch import WorkerError
    from .versions import UnsupportedVersionError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, UnsupportedVersionError, WorkerError)


def run_reporting_errors(action: Callable[[], int | None], extra_errors: tuple = (), cleanup=None) -> int:
    """Run ``action``; return its exit code (0 for None), or 1 after printing a user error as one line."""
    try:
        code = action()
    except (*user_errors(), *extra_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if cleanup is not None:
            cleanup()
    return 0 if code is None else int(code)
