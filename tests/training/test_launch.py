"""What a user sees when a launch fails, and the launch's log: one error line, no torchrun dump, appended logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .test_logging import MEGATRON_LINE

ROOT = Path(__file__).resolve().parents[2]
BAD_SFT = '{"prompt": "a question", "response": "an answer"}\n'
SCHEMA_ERROR = 'bad.jsonl: line 1: expected {"instruction"'


def env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "MEGATRON_PATCH_VERBOSE"}, "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT), **extra}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_no_dump(text: str) -> None:
    for noise in ("Traceback", "ChildFailedError", "OMP_NUM_THREADS", "torch.distributed.elastic"):
        assert noise not in text, text


# --- the launcher's choice of what to print ------------------------------------------------------------------------


def failure(exitcode=1, timestamp=100, data=None):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, error_file_data=data or {"message": "<NONE>"})


def test_first_user_error_wins_over_ranks_stopped_after_it():
    from megatron_patch.errors import USER_ERROR_KEY
    from megatron_patch.torchrun import first_failure_line

    failures = {0: failure(-15, 90),  # stopped by torchrun after rank 1 failed: no error file, earlier second
                1: failure(data={"message": "error: late", "timestamp": 100, USER_ERROR_KEY: 2}),
                2: failure(data={"message": "error: first", "timestamp": 100, USER_ERROR_KEY: 1})}
    assert first_failure_line(failures) == ("error: first (rank 2)", 1)
    same = {r: failure(data={"message": "error: same", "timestamp": 1, USER_ERROR_KEY: r}) for r in range(4)}
    assert first_failure_line(same) == ("error: same", 1)


def test_crash_and_signal_lines():
    from megatron_patch.torchrun import first_failure_line

    assert first_failure_line({3: failure(7)}) == ("error: rank 3 exited with code 7 (its output is above)", 7)
    line, code = first_failure_line({0: failure(-9)})
    assert line == "error: rank 0 was killed by signal SIGKILL (out of host memory?)" and code == 1


# --- real launches ------------------------------------------------------------------------------------------------


def test_rank_user_error_printed_once(workspace, tmp_path):
    """Two ranks both stop on a bad SFT file (no pre-flight here): one line, exit 1, no ChildFailedError dump."""
    from megatron_patch.runtime import free_port

    (tmp_path / "bad.jsonl").write_text(BAD_SFT)
    cmd = [sys.executable, "-m", "megatron_patch.torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_patch.train", "finetune", "--load", workspace["ckpt"],
           "--train-data-path", "bad.jsonl", "--global-batch-size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr
    assert_no_dump(result.stderr + result.stdout)
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: {SCHEMA_ERROR}"), result.stderr


def finetune_script_args(ws, tmp_path, data: str) -> list[str]:
    return ["cpu", "none", str(ROOT), "tiny", "1", "1e-4", "1e-5", "64", "64", "0", "fp32", "1", "1", "none",
            "false", "false", "false", data, "none", ws["ckpt"], "1", str(tmp_path / "out")]


def test_script_preflight_stops_bad_sft_before_launch(workspace, tmp_path):
    (tmp_path / "bad.jsonl").write_text(BAD_SFT)
    script = ROOT / "examples" / "llama" / "run_finetune_megatron_llama.sh"
    result = subprocess.run(["bash", str(script), *finetune_script_args(workspace, tmp_path, "bad.jsonl")],
                            capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_dump(result.stdout + result.stderr)
    errors = error_lines(result.stdout)  # the launch output is tee'd to the log, stderr included
    assert len(errors) == 1 and errors[0].startswith(f"error: {SCHEMA_ERROR}")
    assert "note:" not in result.stdout  # stopped by the pre-flight: no rank started
    log = next((tmp_path / "out" / "log").glob("finetune-llama-*.log")).read_text()
    assert "===== " in log and "megatron_patch.torchrun" in log and errors[0] in log


def pretrain_script_args(ws, tmp_path, iters: int) -> list[str]:
    gbs, seq = 4, 64
    return ["cpu", "none", str(ROOT), "tiny", "2", str(gbs), "1e-3", "1e-4", str(seq), str(seq), "0", "fp32", "1",
            "1", "none", "false", "false", "false", "100", ws["data"], ws["ckpt"], str(gbs * seq * iters), "0",
            str(tmp_path / "out")]


def test_script_log_is_megatron_format_and_appended(workspace, tmp_path):
    script = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
    args = pretrain_script_args(workspace, tmp_path, iters=3)
    extra = env(MP_EXTRA_ARGS="--split 100,0,0")
    first = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=extra, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = [m.groupdict() for m in map(MEGATRON_LINE.match, first.stdout.splitlines()) if m]
    assert [(r["iteration"], r["train_iters"], r["samples"], r["gbs"]) for r in rows] == [
        ("1", "3", "4", "4"), ("2", "3", "8", "4"), ("3", "3", "12", "4")], first.stdout
    assert "UserWarning" not in first.stdout + first.stderr  # third-party warnings stay off by default
    # The same command again resumes from its own checkpoint (nothing left to train); the log keeps both launches.
    second = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=extra, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:]
    log = next((tmp_path / "out" / "log").glob("pretrain-llama-*.log")).read_text()
    assert log.count("\n===== ") == 2 and len([ln for ln in log.splitlines() if MEGATRON_LINE.match(ln)]) == 3
    assert "resumed at iteration 3" in log
    assert "nothing to train: the checkpoint is at iteration 3 and --train-iters is 3" in second.stdout


@pytest.mark.parametrize("size,message", [
    ("7B", "--model-size 7B (32 layers, hidden 4096) does not match the --load checkpoint (4 layers, hidden 128): "
           "the checkpoint is llama preset tiny"),
    ("13b-chat", "llama has no size preset '13b-chat' (available: tiny, 7B, 13B, 70B"),
])
def test_preflight_names_the_presets(workspace, size, message):
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.preflight import preflight

    cfg = TrainConfig(mode="pretrain", load=workspace["ckpt"], model_size=size, data_path=[workspace["data"]],
                      train_iters=1, global_batch_size=1)
    with pytest.raises(ValueError) as error:
        preflight(cfg, world_size=1)
    assert str(error.value).startswith(message)


def test_preflight_reads_only_the_first_sft_lines(workspace, tmp_path):
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.preflight import SFT_LINES_CHECKED, preflight

    good = '{"instruction": "say hi", "output": "hi"}\n'
    data = tmp_path / "sft.jsonl"
    data.write_text(good * SFT_LINES_CHECKED + BAD_SFT)  # a bad line past the checked ones: left to the ranks
    cfg = TrainConfig(mode="finetune", load=workspace["ckpt"], train_data_path=str(data), global_batch_size=1)
    preflight(cfg, world_size=1)
    data.write_text(good + '{"messages": "hello"}\n')
    with pytest.raises(ValueError, match=r'sft.jsonl: line 2: "messages" must be a list of \{"role", "content"\}'):
        preflight(cfg, world_size=1)
