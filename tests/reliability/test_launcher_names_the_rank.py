"""The launcher names the rank that failed, not one torchrun stopped after it (issue 23, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from megatron_patch.runtime import free_port
from megatron_patch.torchrun import first_failure_line

from .conftest import TALLY

ROOT = Path(__file__).resolve().parents[2]

RANK_SCRIPT = """
import os, signal, time
if os.environ["RANK"] == "1":
    time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
"""


def failure(exitcode: int, timestamp: int = 100):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, error_file_data={"message": "<NONE>"})


def test_a_killed_rank_is_named_before_the_ranks_stopped_after_it():
    """torchrun's timestamps are whole seconds: rank 0, stopped by SIGTERM in the same second, came first."""
    line, code = first_failure_line({0: failure(-15), 1: failure(-9)})
    assert line == "error: rank 1 was killed by signal SIGKILL (out of host memory?)" and code == 1
    line, _ = first_failure_line({0: failure(-15), 1: failure(3, 101)})  # a crash named even when a second later
    assert line == "error: rank 1 exited with code 3 (its output is above)"
    assert first_failure_line({0: failure(-15, 101), 1: failure(-15)})[0] == "error: rank 1 was killed by signal SIGTERM"


def test_rank_1_of_2_killed_is_named(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    TALLY["tried"] += 1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "megatron_patch.torchrun", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(free_port()), str(script)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: rank 1 was killed by signal SIGKILL (out of host memory?)", (
        result.stderr)
    assert "Traceback" not in result.stderr
    TALLY["refused cleanly"] += 1
