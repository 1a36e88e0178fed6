"""Helper processes die with the process that started them.

A rank killed with SIGKILL cannot stop its helpers: megatron-core's torch_dist writer keeps its results queue in a
``multiprocessing`` Manager, a spawned server process (plus the resource tracker it holds open) that then sleeps
for ever under init with the run's log open. Linux can do it for us: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the
helper makes the kernel kill it when its parent ends, however the parent ends.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WRITER_QUEUE_INSTALLED = False


def die_with_parent_initializer(parent_pid: int):
    """An initializer for a spawned helper: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, and exit at once if ``parent_pid``
    is already gone (it may die before the call). ``exec`` of a few lines, picklable and importing nothing of ours:
    unpickling a function of this package in the helper would import it (and torch), 3-4 s per spawn. None off
    Linux (no such call there)."""
    if not sys.platform.startswith("linux"):
        return None
    code = (f"import ctypes, os\nctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
            f"if os.getppid() != {int(parent_pid)}:\n    os._exit(1)\n")
    return functools.partial(exec, code, {})


def checkpoint_writer_queue_dies_with_parent() -> None:
    """Give megatron-core's torch_dist writer its results queue from a Manager whose server dies with this process.

    Patch (runtime only, megatron-core 0.16): ``dist_checkpointing.strategies.filesystem_async._results_queue``, the
    module's lazily created queue (``ctx.Manager().Queue()`` on the first save, a Manager that outlives a killed
    rank). Set once per process, before the first save; left alone if megatron-core already made its own.
    """
    global _WRITER_QUEUE_INSTALLED
    if _WRITER_QUEUE_INSTALLED:
        return
    import multiprocessing.managers

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from .versions import check_megatron_version

    check_megatron_version()
    if getattr(filesystem_async, "_results_queue", "absent") is None:  # the 0.16 seam: not created yet
        manager = multiprocessing.managers.SyncManager(ctx=filesystem_async.mp.get_context("spawn"))
        manager.start(initializer=die_with_parent_initializer(os.getpid()))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager alive
    _WRITER_QUEUE_INSTALLED = True
