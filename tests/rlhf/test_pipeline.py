"""The one-command InstructGPT pipeline (SFT -> reward model -> PPO with that reward model and PTX) completes on the
toy task at tiny sizes and leaves each stage's checkpoint."""

from __future__ import annotations

import json

from megatron_patch.rlhf.pipeline import PipelineSizes, count_score, run_pipeline, write_count_preferences


def test_count_preferences_rank_by_digits_right(tmp_path):
    train, valid = write_count_preferences(tmp_path, n_train=32, n_valid=8)
    for path in (train, valid):
        for line in open(path):
            pair = json.loads(line)
            instruction = _instruction(pair["prompt"])
            assert count_score(instruction, pair["chosen"]) > count_score(instruction, pair["rejected"])


def _instruction(prompt: str) -> str:
    """The four digits the SFT template wraps (the only 4-digit run in it)."""
    import re

    return re.findall(r"\d{4}", prompt)[0]


def test_instructgpt_pipeline_writes_every_stage(tmp_path):
    out = run_pipeline(tmp_path, PipelineSizes(sft_iters=2, rm_iters=2, rl_iters=2))
    assert [i for i, _ in out["sft_history"]] == [1, 2]
    assert 0.0 <= out["rm_eval"]["accuracy"] <= 1.0
    assert [i for i, _ in out["rl_history"]] == [1, 2]
    assert all("actor/ptx_loss" in metrics for _, metrics in out["rl_history"])  # the PTX term ran
    for stage in ("sft", "reward_model", "ppo/actor", "ppo/critic"):
        assert (tmp_path / stage / "iter_0000002" / "megatron_patch.json").is_file(), stage
    assert (tmp_path / "reward_model" / "iter_0000002" / "reward_model.json").is_file()
    assert len(out["greedy_task_reward"]) == 2 and all(0.0 <= r <= 1.0 for r in out["greedy_task_reward"])
