"""The toolkit's errors: one base class, one subclass per domain. A leaf module: it imports nothing of ours.

An error of these classes describes bad input or a machine that cannot do the job, and its message is one
actionable line; entry points print it as ``error: <message>`` and exit 1. Anything else keeps its traceback.
"""

from __future__ import annotations


class MegatronPatchError(Exception):
    """Base of every user-facing error of megatron-patch (one-line message)."""


class CheckpointError(MegatronPatchError, ValueError):
    """A checkpoint that cannot be read, is unsafe to load, or does not match its configuration."""
