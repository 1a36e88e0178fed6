"""The one-command InstructGPT pipeline (SFT -> reward model -> PPO with that reward model and PTX) completes on the
digit task at tiny sizes and leaves each stage's checkpoint."""

from __future__ import annotations

import json
import re

from megatron_patch.rlhf.examples.pipeline import PipelineSizes, digits_right, run_pipeline, write_task_preferences
from megatron_patch.rlhf.examples.tasks import write_digit_task


def test_task_preferences_rank_by_digits_right(tmp_path):
    paths = write_digit_task(tmp_path / "data", "copy", 4, n_sft=64, n_train=8, n_eval=8)
    train, valid = write_task_preferences(tmp_path, paths["sft"], n_train=32, n_valid=8)
    lazy = 0
    held_out = {json.loads(line)["prompt"] for line in open(paths["eval"])}
    for path in (train, valid):
        for line in open(path):
            pair = json.loads(line)
            assert pair["prompt"] not in held_out
            truth = re.findall(r"\d{4}", pair["prompt"])[0]
            assert digits_right(pair["chosen"], truth) >= digits_right(pair["rejected"], truth) + 3
            lazy += pair["rejected"] == "0000"
    assert lazy > 0  # some pairs reject the distractor's answer


def test_instructgpt_pipeline_writes_every_stage(tmp_path):
    out = run_pipeline(tmp_path, PipelineSizes(sft_iters=2, rm_iters=2, rl_iters=2))
    assert [i for i, _ in out["sft_history"]] == [1, 2]
    assert 0.0 <= out["rm_eval"]["accuracy"] <= 1.0
    assert [i for i, _ in out["rl_history"]] == [1, 2]
    assert all("actor/ptx_loss" in metrics for _, metrics in out["rl_history"])  # the PTX term ran
    for stage in ("sft", "reward_model", "ppo/actor", "ppo/critic"):
        assert (tmp_path / stage / "iter_0000002" / "megatron_patch.json").is_file(), stage
    assert (tmp_path / "reward_model" / "iter_0000002" / "reward_model.json").is_file()
    assert len(out["greedy_task_reward"]) == 2
    assert all(0.0 <= score <= 1.0 for scores in out["greedy_task_reward"] for score in scores)
