"""The RLHF launch scripts launch as the training scripts do (issue 19, item 7): the entry point's pre-flight in one
process before any rank, one line naming what to change, the log appended with a header, no third-party noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TALLY

ROOT = Path(__file__).resolve().parents[2]


def dpo_args(tmp_path: Path, ckpt: Path, data: Path, **kw) -> list[str]:
    args = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="auto", BATCH_SIZE="1",
                GLOBAL_BATCH_SIZE="2", LR="1e-5", MIN_LR="1e-6", BETA="0.1", SEQ_LEN="32", PR="fp32", TP="1", PP="1",
                AC="none", DO="false", FL="false", SP="false", TRAIN_DATASET_PATH=str(data), VALID_DATASET_PATH="none",
                PRETRAIN_CHECKPOINT_PATH=str(ckpt), EPOCH="1", OUTPUT_BASEPATH=str(tmp_path / "out"))
    args.update(kw)
    return list(args.values())


def launch(args: list[str], **env) -> subprocess.CompletedProcess:
    script = ROOT / "rlhf" / "run_dpo_megatron_llama.sh"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=600)


def pairs(path: Path, n: int, bad_line: int | None = None) -> Path:
    lines = [{"prompt": f"question {i}", "chosen": "good answer", "rejected": "bad"} for i in range(n)]
    if bad_line is not None:
        lines[bad_line - 1]["chosen"] = ""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_bad_preference_data_stops_the_launch_before_any_rank(converted, tmp_path):
    data = pairs(tmp_path / "pairs.jsonl", 4, bad_line=2)
    TALLY["tried"] += 1
    result = launch(dpo_args(tmp_path, converted, data))
    # The pre-flight's lines are tee'd into the log (stdout); nothing on stderr (no third-party warning, no
    # traceback, no torchrun banner).
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and errors == [
        f"error: {data}: line 2: 'chosen' is an empty response (pass --skip-bad-lines to skip such lines)"], (
        result.stdout + result.stderr)
    assert result.stderr == "", result.stderr
    (log,) = (tmp_path / "out" / "log").glob("dpo-*.log")
    assert log.read_text().count("===== ") == 1 and errors[0] in log.read_text()  # a header line per launch
    assert not (tmp_path / "out" / "checkpoint").exists()  # no rank started, nothing written
    TALLY["refused cleanly"] += 1


def ppo_argv(ckpt: Path, prompts: Path, *extra: str) -> list[str]:
    return ["--load", str(ckpt), "--seq-length", "32", "--prompt-data-path", str(prompts), "--reward", "count_up",
            "--max-new-tokens", "8", "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "1", *extra]


def test_ppo_check_runs_the_rank_checks_in_one_process(converted, tmp_path, capsys):
    from megatron_patch.rlhf.ppo.loop import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 2"}\n{"prompt": "3 4"}\n')
    assert main(ppo_argv(converted, prompts, "--check", "--world-size", "2")) == 0
    TALLY["tried"] += 1
    assert main(ppo_argv(converted, prompts, "--check", "--world-size", "3")) == 1
    assert capsys.readouterr().err == "error: --global-batch-size 2 (prompts per iteration) must divide by the " \
                                      "data-parallel size 3\n"
    TALLY["refused cleanly"] += 1


def test_rl_booleans_are_switches_as_the_training_flags():
    """One way to spell a boolean: --flag turns on, --no-flag turns off what is on by default; never --flag true."""
    import argparse

    from megatron_patch.rlhf.ppo.config import add_rl_arguments, rl_config_from_args

    parser = argparse.ArgumentParser()
    add_rl_arguments(parser)
    rl = rl_config_from_args(parser.parse_args(["--reward-norm", "--no-grpo-norm-by-std", "--no-use-kl-in-reward"]))
    assert rl.reward_norm and not rl.grpo_norm_by_std and rl.use_kl_in_reward is False and rl.use_kl_loss is None
    for argv in (["--use-kl-in-reward", "true"], ["--no-reward-norm"], ["--grpo-norm-by-std"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.slow
def test_dpo_launch_trains_through_the_script(converted, tmp_path):
    """A real 2-iteration DPO run through the script, after a refused launch of the same run: the ranks start through
    runtime.rank_main (quiet), the log is appended."""
    data = pairs(tmp_path / "pairs.jsonl", 4)
    result = launch(dpo_args(tmp_path, converted, data, MIN_LR="2e-5"))  # the same run name: the same log
    assert result.returncode == 1 and result.stdout.splitlines()[1:] == [
        "error: --min-lr 2e-05 is larger than --lr 1e-05 [the script's LR=1e-5, MIN_LR=2e-5]"], (
        result.stdout + result.stderr)
    result = launch(dpo_args(tmp_path, converted, data), MP_EXTRA_ARGS="--distributed-timeout-minutes 5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr and "W1" not in result.stdout + result.stderr, (
        result.stdout + result.stderr)
    assert "saved the DPO policy of iteration 2" in result.stdout, result.stdout
    (log,) = (tmp_path / "out" / "log").glob("dpo-*.log")
    assert log.read_text().count("===== ") == 2
