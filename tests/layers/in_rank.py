"""Run a test body in one local rank that has megatron-core's parallel state (TP=1), not in the pytest process.

The pytest process must never initialise torch.distributed itself: local ranks forked after it has (even after
``destroy_distributed``) hang in their own ``init_distributed``, and later tests fork ranks.
"""

from __future__ import annotations

import functools
import importlib

import megatron.core.transformer.dot_product_attention  # noqa: F401  (imported here once: forked ranks start warm)

from megatron_patch.runtime import run_on_local_ranks


def _call(module: str, name: str, args: tuple, kwargs: dict) -> None:
    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1, seed=0)
    getattr(importlib.import_module(module), name).__wrapped__(*args, **kwargs)  # the undecorated test body


def in_rank(test):
    """Decorator: the test runs in a fresh local rank; a failure there fails the test with the rank's traceback."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        run_on_local_ranks(_call, 1, test.__module__, test.__name__, args, kwargs, timeout=300)

    return run
