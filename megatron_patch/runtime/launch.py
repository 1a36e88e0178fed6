"""Run a function on N local ranks (one process each), as torchrun would, for tools that shard work themselves.

Used by the converter (torch_dist needs every TP x PP rank to save its own shards) and by the tests. Every child
is joined; a child that fails or a run that exceeds its timeout stops all of them and raises in the parent.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import time
import traceback

import psutil
import torch.multiprocessing as mp

from ..errors import INTERRUPTED_EXIT_CODE, WorkerError, user_errors
from .distributed import free_port
from .noise import quiet_third_party


def _die_with_parent(parent_pid: int) -> None:
    """Make this rank exit when the launching process dies (kill -9 included): Linux's parent-death signal, and a
    check that the parent did not die before it was armed."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _child(rank, world_size, port, env, fn, args, results, parent_pid):
    _die_with_parent(parent_pid)
    os.environ.update(env)
    quiet_third_party()  # as the parent asked (MEGATRON_PATCH_VERBOSE is inherited)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        # Plain pickle bytes: torch.multiprocessing would pass tensors as shared-memory file descriptors, which are
        # gone when this rank exits before the parent reads the queue (a lost result, seen on a loaded machine).
        results.put((rank, True, pickle.dumps(fn(*args))))
    except Exception as error:  # reported to the parent, which re-raises; the child then exits non-zero
        message = str(error) if isinstance(error, user_errors()) else traceback.format_exc()
        results.put((rank, False, message))
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent says it once
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        from .distributed import destroy_distributed

        destroy_distributed()


def _stop_tree(proc) -> None:
    """Terminate a rank and everything it started (dist_checkpointing's Manager process would outlive it)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    proc.terminate()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=10)


def _cpu_seconds(procs) -> float:
    """CPU time the ranks and everything they started have used so far (what a working rank adds to, and a rank
    blocked in a collective whose peer hangs does not)."""
    total = 0.0
    for proc in procs:
        try:
            process = psutil.Process(proc.pid)
            for each in [process, *process.children(recursive=True)]:
                times = each.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            continue
    return total


PROGRESS_CPU_SECONDS = 0.1  # CPU time the ranks must add to count as progress (a hung rank adds ~0)


def run_on_local_ranks(fn, world_size: int, *args, timeout: float = 900.0, env: dict | None = None) -> list:
    """Call ``fn(*args)`` in ``world_size`` spawned processes with torchrun's environment; return their results.

    ``fn`` must be importable (module level) and return something picklable. Raises ``WorkerError`` with the
    first failing rank's message. Children start with ``spawn`` (a fresh interpreter); a test suite that has
    already imported megatron-core may set MEGATRON_PATCH_START_METHOD=fork to skip re-importing it per rank.

    ``timeout`` is a watchdog on progress, not on the total time: the ranks are stopped when they have used no CPU
    time for ``timeout`` seconds (hung), however long a slow machine takes to finish.
    """
    ctx = mp.get_context(os.environ.get("MEGATRON_PATCH_START_METHOD", "spawn"))
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, env, fn, args, results, os.getpid()), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, object]] = {}
    last_progress, cpu_mark = time.monotonic(), 0.0
    try:
        while len(outcomes) < world_size:
            cpu = _cpu_seconds(procs)
            if cpu - cpu_mark >= PROGRESS_CPU_SECONDS:
                last_progress, cpu_mark = time.monotonic(), cpu
            if time.monotonic() - last_progress > timeout:
                raise WorkerError(f"local ranks made no progress for {timeout:.0f}s (no CPU time used: hung?)")
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(outcomes) < world_size and results.empty():
                    time.sleep(0.5)  # let a dying child's report arrive before declaring it lost
                    if results.empty():
                        raise WorkerError(f"a local rank exited with code {dead[0].exitcode} without a report") from None
                continue
            outcomes[rank] = (ok, pickle.loads(value) if ok else value)
            if not ok:
                raise WorkerError(f"rank {rank} failed: {value}")
    finally:
        succeeded = len(outcomes) == world_size and all(ok for ok, _ in outcomes.values())
        for proc in procs:
            proc.join(timeout=60 if succeeded else 0.1)  # a finished rank still tears down gloo and its helpers
        for proc in procs:
            if proc.is_alive() or proc.exitcode is None:
                _stop_tree(proc)
    return [outcomes[rank][1] for rank in range(world_size)]
