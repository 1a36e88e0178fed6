"""The toolkit's errors and the one reporter every CLI uses. A leaf module: it imports nothing of ours.

An error of these classes describes bad input or a machine that cannot do the job, and its message is one
actionable line; entry points run their work through ``run_reporting_errors``, which prints it as
``error: <message>`` and exits 1. Anything else (a bug, a crash inside torch) keeps its traceback.

Classes that describe bad input also derive from ``ValueError`` and those that describe the machine or the run from
``RuntimeError``, so callers that catch the builtin kinds keep working.

Under ``python -m megatron_patch.torchrun`` (what the launch scripts use) a rank hands its line to the launcher
through torchrun's per-rank error file instead of printing it; the launcher prints the first failing rank's line
once, in place of torchrun's ChildFailedError dump.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable


class MegatronPatchError(Exception):
    """Base of every user-facing error of megatron-patch (one-line message)."""


# --- bad input ------------------------------------------------------------------------------------------------------


class ConfigError(MegatronPatchError, ValueError):
    """A flag value, or a combination of flags, that cannot work; the message names the caller's flag to change."""


class OverlappingPathsError(ConfigError):
    """An output path that is, contains or lies inside an input path."""


class CheckpointError(MegatronPatchError, ValueError):
    """A checkpoint that cannot be read, is unsafe to load, or does not match its configuration."""


class UnsupportedModelError(MegatronPatchError, ValueError):
    """A HF architecture or config option this toolkit cannot represent in megatron-core."""


class DataError(MegatronPatchError, ValueError):
    """A data, prompt or tokenizer file that does not have the expected content."""


class BadLineError(DataError):
    """A line of a jsonl input that cannot be used (not JSON, missing the key, wrong type)."""


class GenerationError(MegatronPatchError, ValueError):
    """A generation request that cannot run."""


# --- the machine or the run -----------------------------------------------------------------------------------------


class MachineSupportError(MegatronPatchError, RuntimeError):
    """The run asks for something this machine cannot do (no GPU, no Transformer Engine, no NCCL, old GPU)."""


class UnsupportedVersionError(MegatronPatchError, RuntimeError):
    """An installed library (megatron-core) whose version this toolkit was not written against."""


class WorkerError(MegatronPatchError, RuntimeError):
    """A local worker process failed or did not finish; the message carries the first failing rank's report."""


class WorkerDiedError(MegatronPatchError, RuntimeError):
    """A tokenizer worker of the preprocessing pool died (out of memory, killed)."""


# Path errors the OS raises for what a user typed (a missing input, an output that exists) are reported the same way.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


# OSErrors of the storage that the user fixes (free space, a writable output), not bugs: reported as one line.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error_line(error: OSError, what: str | None = None) -> str:
    """One line for a full, read-only or forbidden output: the file (or ``what``), the reason, the way out."""
    where = what or (f"{error.filename}" if error.filename else "the output")
    return f"cannot write {where}: {error.strerror or error}; free space or choose a writable output"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line (everything else keeps its traceback)."""
    return (MegatronPatchError, *USER_OS_ERRORS)


# --- the reporter ---------------------------------------------------------------------------------------------------

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
LAUNCHER_ENV = "MEGATRON_PATCH_LAUNCHER"  # "1" in ranks started by megatron_patch.torchrun
USER_ERROR_KEY = "megatron_patch_user_error"  # marks our lines in torchrun's error files


def run_reporting_errors(action: Callable[[], int | None], cleanup: Callable[[], None] | None = None) -> int:
    """Run ``action``; return its exit code (0 for None), or 1 after printing a user error as one line.

    Args:
        action: the entry point's work.
        cleanup: called however ``action`` ends (e.g. tearing down the process groups).
    """
    try:
        code = action()
    except user_errors() as error:
        report_user_error(str(error))
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    except OSError as error:  # a full or read-only disk: the user's to fix, in one line
        if error.errno not in STORAGE_ERRNOS:
            raise
        report_user_error(storage_error_line(error))
        return 1
    finally:
        if cleanup is not None:
            cleanup()
    return 0 if code is None else int(code)


SCRIPT_ARGS_ENV = "MEGATRON_PATCH_SCRIPT_ARGS"  # set by the positional launch scripts: lines "<flag>=<what to type>"
SCRIPT_ARGS_MARK = " [the script's "


def name_script_arguments(message: str, table: str | None = None) -> str:
    """``message`` plus the launch script's arguments behind the flags it names.

    A user of a positional script typed SP=true and TP=1, MODEL_NAME=qwen-7b or SKIP_BAD_LINES, not the flags the
    script passed on: "--sequence-parallel needs --tensor-model-parallel-size > 1" becomes "... [the script's SP=true,
    TP=1]". ``table`` (default: the ``MEGATRON_PATCH_SCRIPT_ARGS`` environment variable) has one line per flag,
    ``<flag>=<what the user types>`` (``--overwrite=OVERWRITE=true``); a message already named is left alone.
    """
    table = os.environ.get(SCRIPT_ARGS_ENV) if table is None else table
    if not table or SCRIPT_ARGS_MARK in message:
        return message
    named = []
    for line in table.splitlines():
        flag, _, argument = line.partition("=")
        if flag and argument and re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) and argument not in named:
            named.append(argument)
    return f"{message}{SCRIPT_ARGS_MARK}{', '.join(named)}]" if named else message


def report_user_error(message: str) -> None:
    """Print ``error: <message>`` on stderr; in a rank under torchrun also record it in the rank's error file.
    Started by a positional launch script, the message also names the script's arguments behind its flags.

    torchrun (TORCHELASTIC_ERROR_FILE) reads a ``{"message": str, "timestamp": int}`` file; the extra key lets
    megatron_patch.torchrun tell our one-line errors from crashes and order ranks by the moment they failed.
    """
    line = f"error: {name_script_arguments(message)}"
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
