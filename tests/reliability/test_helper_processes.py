"""Helper processes die with the rank that started them (issue 23, item 6): a rank killed with SIGKILL during a
checkpoint save left megatron-core's writer Manager (and its resource tracker) asleep under init."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import TALLY

RANK = """
import multiprocessing, sys, time
from megatron_patch.runtime.helpers import checkpoint_writer_queue_dies_with_parent
from megatron.core.dist_checkpointing.strategies import filesystem_async

checkpoint_writer_queue_dies_with_parent()  # what every training save does first
filesystem_async._get_write_results_queue()  # what megatron-core's writer asks for
from multiprocessing import resource_tracker
tracker = [resource_tracker._resource_tracker._pid] if resource_tracker._resource_tracker._pid else []
print(" ".join(str(pid) for pid in [child.pid for child in multiprocessing.active_children()] + tracker), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state != "Z"


def test_the_writer_manager_dies_with_a_killed_rank():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rank = subprocess.Popen([sys.executable, "-c", RANK], env=env, stdout=subprocess.PIPE, text=True)
    helpers = []
    try:
        helpers = [int(pid) for pid in rank.stdout.readline().split()]
        assert helpers, "the rank started no helper process"
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=60)
        deadline = time.monotonic() + 30  # a bound on a lingering helper, not a timing assertion
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        TALLY["tried"] += 1
        assert not any(alive(pid) for pid in helpers), f"helpers {helpers} outlived the killed rank"
        TALLY["refused cleanly"] += 1
    finally:
        rank.kill()
        for pid in helpers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
