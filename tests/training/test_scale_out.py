"""Scale-out and resume (issue 13, item 8): a two-node launch through the scripts' dlc path equals the one-node run;
resume equals an uninterrupted run with the distributed optimizer, and at TP=2 x PP=2 in bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.runtime import free_port, run_on_local_ranks

from .test_logging import MEGATRON_LINE
from .workers import train_worker

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
ITERS, GBS, SEQ = 3, 4, 64


def _script_args(ws, out: Path) -> list[str]:
    return ["dsw", "none", str(ROOT), "tiny", "2", str(GBS), "1e-3", "1e-4", str(SEQ), str(SEQ), "0", "fp32", "1",
            "1", "none", "false", "false", "false", "100", ws["data"], ws["ckpt"], str(GBS * SEQ * ITERS), "0",
            str(out)]


def _launch(args: list[str], **extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "MP_EXTRA_ARGS": "--split 100,0,0", **extra}
    return subprocess.Popen(["bash", str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def _losses(output: str) -> dict[int, float]:
    rows = [m.groupdict() for m in map(MEGATRON_LINE.match, output.splitlines()) if m]
    return {int(r["iteration"]): float(r["loss"]) for r in rows}


def test_two_node_dlc_launch_equals_one_node(workspace, tmp_path):
    # ENV=dsw listens on Megatron-LM's MASTER_PORT 6000 unless told otherwise: a free one, for parallel test runs
    one = _launch(_script_args(workspace, tmp_path / "one"), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    one_out, _ = one.communicate(timeout=900)
    assert one.returncode == 0, one_out[-3000:]
    port = str(free_port())
    dlc_args = _script_args(workspace, tmp_path / "two")
    dlc_args[0] = "dlc"
    nodes = [_launch(dlc_args, GPUS_PER_NODE="1", WORLD_SIZE="2", RANK=str(node), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) for node in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=900)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    expected = _losses(one_out)
    assert sorted(expected) == list(range(1, ITERS + 1)), one_out[-2000:]
    assert _losses(outputs[0]) == expected  # node 0 holds global rank 0, which logs


def _config(ws, save: Path, **overrides) -> dict:
    cfg = dict(mode="pretrain", load=ws["ckpt"], data_path=[ws["data"]], split="100,0,0", seq_length=SEQ,
               micro_batch_size=1, global_batch_size=GBS, train_iters=4, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1,
               seed=1234, log_interval=1, save=str(save), save_interval=2)
    cfg.update(overrides)
    return cfg


def _resume_from(save: Path, iteration: int) -> None:
    """Make ``save`` look like the run stopped after ``iteration`` (a later save removed)."""
    import shutil

    for later in save.glob("iter_*"):
        if int(later.name.removeprefix("iter_")) > iteration:
            shutil.rmtree(later)
    (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))


@pytest.mark.parametrize("world,overrides", [
    (2, {"use_distributed_optimizer": True}),
    (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "bf16": True}),
], ids=["dp2-distributed-optimizer", "tp2-pp2-bf16"])
def test_resume_equals_uninterrupted(workspace, tmp_path, world, overrides):
    save = tmp_path / "ckpt"
    cfg = _config(workspace, save, **overrides)
    full = dict(run_on_local_ranks(train_worker, world, cfg, timeout=900)[0])
    _resume_from(save, 2)
    resumed = dict(run_on_local_ranks(train_worker, world, cfg, timeout=900)[0])
    assert sorted(resumed) == [3, 4]
    assert {k: full[k] for k in resumed} == resumed  # bit-identical, not just close
