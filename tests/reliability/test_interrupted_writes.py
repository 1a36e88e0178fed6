"""A writer killed with SIGKILL leaves its temporary sibling; the next run removes it (issue 13, item 6)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_patch.checkpoint.atomic import atomic_output_dir, remove_stale_siblings


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_dead_writers_of_this_host_are_removed(tmp_path):
    out, host = tmp_path / "ckpt", socket.gethostname()
    dead = tmp_path / f".ckpt.tmp-{dead_pid()}@{host}-abc123"
    live = tmp_path / f".ckpt.tmp-{os.getppid()}@{host}-def456"
    elsewhere = tmp_path / f".ckpt.tmp-{dead_pid()}@another-host-ghi789"
    unrelated = tmp_path / ".ckpt2.tmp-1@x-aaa"
    for path in (dead, live, elsewhere, unrelated):
        path.mkdir()
    assert remove_stale_siblings(out) == [dead]
    assert not dead.exists() and live.exists() and elsewhere.exists() and unrelated.exists()


def test_the_next_write_cleans_up(tmp_path):
    stale = tmp_path / f".ckpt.tmp-{dead_pid()}@{socket.gethostname()}-zzz"
    stale.mkdir()
    with atomic_output_dir(tmp_path / "ckpt") as temp:
        assert f".ckpt.tmp-{os.getpid()}@" in temp.name
        (temp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_9_during_hf2mcore_then_rerun(make_hf, tmp_path):
    hf = make_hf("kill9", hidden_size=256, intermediate_size=2048, num_hidden_layers=8, vocab_size=16000)
    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "megatron_patch.convert", "hf2mcore", "--load", hf, "--save", str(out),
               "--format", "legacy", "--tp", "2"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # a bound on a hung child, not a timing assertion
        while not list(tmp_path.glob(".ckpt.tmp-*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert list(tmp_path.glob(".ckpt.tmp-*")), "the kill left no temporary sibling to clean up"
    assert not out.exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
