"""toolkits/benchmarks/rlhf_benchmark.py, GRPO: the TRL settings mirror ours, and our side runs on a tiny setting
with its held-out evaluation (transformers greedy on the exported weights) equal to our engine's own in the loop."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_patch.rlhf.examples.demo import TINY, rl_configs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "toolkits" / "benchmarks"))  # local ranks (fork or spawn) import the script by name
import rlhf_benchmark as bench  # noqa: E402 - the script is not a package module

TASK = dict(n_sft=16, n_train=64, n_eval=16)
SMALL = dict(global_batch_size=2, micro_batch_size=4, n_samples_per_prompt=4)  # 8 samples, 2 optimizer steps
# A random model scores 0 on every sample, so GRPO's advantages (and, at the start, the KL loss's gradient) are 0:
# the entropy bonus is what moves the weights in the tiny run.
MOVING = dict(SMALL, entropy_coef=0.5)


def test_trl_settings_mirror_the_demo_grpo():
    cfg, rl = rl_configs("grpo", "ckpt", "prompts.jsonl", 20)
    s = bench.trl_grpo_settings(cfg, rl)
    samples = cfg["global_batch_size"] * rl["n_samples_per_prompt"]  # 8 prompts x 8
    assert s["steps_per_generation"] * s["per_device_train_batch_size"] == samples == 64
    per_step = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    assert per_step == samples // rl["ppo_mini_batches"] == 32
    assert s["max_steps"] == 20 * rl["ppo_mini_batches"] and s["num_generations"] == 8
    assert (s["beta"], s["learning_rate"], s["temperature"], s["max_completion_length"]) == (
        rl["kl_coef"], cfg["lr"], rl["temperature"], rl["max_new_tokens"])
    assert (s["loss_type"], s["scale_rewards"], s["bf16"], s["gradient_checkpointing"]) == ("dapo", "group", False,
                                                                                              False)
    with pytest.raises(ValueError, match="mirrors GRPO"):
        bench.trl_grpo_settings(*rl_configs("rloo", "ckpt", "prompts.jsonl", 20))


def test_trl_reward_is_our_digit_match():
    assert bench.digit_match_reward(["p", "p"], ["1234", "1299 "], answer=["1234", "1234"]) == [1.0, 0.5]


def test_ours_grpo_side_on_a_tiny_model(make_hf, tmp_path):
    hf = make_hf("rlhf_bench", **TINY)
    start = bench.grpo_start(tmp_path, hf, 0, TASK)
    ours = bench.run_ours_grpo(start, tmp_path, 2, 1, **MOVING)
    before = bench.evaluate_hf(start["hf"], hf, start["eval"], ours["max_new_tokens"])
    after = bench.evaluate_hf(ours["hf"], hf, start["eval"], ours["max_new_tokens"])
    # The common evaluation (transformers on the HF weights) answers as our engine does in its loop, before RL (the
    # start) and after it (ours exported with mcore2hf).
    for (_, engine), hf_eval in zip((ours["evals"][0], ours["evals"][-1]), (before, after)):
        assert (hf_eval["exact_match"], hf_eval["distinct"]) == (engine["eval/exact_match"], engine["eval/distinct"])
        assert hf_eval["digit_match"] == pytest.approx(engine["eval/reward"], abs=1e-12)
    assert 0 < before["distinct"] <= 1
    start_weights, trained = load_file(Path(hf) / "model.safetensors"), load_file(Path(ours["hf"]) / "model.safetensors")
    assert start_weights.keys() == trained.keys()
    assert any(not (start_weights[k] == trained[k]).all() for k in start_weights)  # trained, exported
    assert ours["step"] > 0 and ours["peak_mb"] > 0 and 0 < ours["rollout"] < ours["rollout"] + ours["training"]
    lines = bench.report_grpo(before, {"ours": ours}, {"ours": after})
    assert lines[1].startswith("ours") and "cross-check" in lines[-1]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install -e .[bench])")
def test_trl_grpo_side_on_a_tiny_model(make_hf, tmp_path):
    hf = make_hf("rlhf_bench", **TINY)
    start = bench.grpo_start(tmp_path, hf, 0, TASK)
    cfg, rl = bench.grpo_configs(start, 2, str(tmp_path / "ours"), **SMALL)
    trl = bench.trl_grpo(hf, start["prompts"], str(tmp_path / "trl"), bench.trl_grpo_settings(cfg, rl), 1)
    assert trl["step"] > 0 and trl["rollout"] > 0 and trl["peak_mb"] > 0
    after = bench.evaluate_hf(str(tmp_path / "trl" / "final"), hf, start["eval"], rl["max_new_tokens"])
    assert 0 < after["distinct"] <= 1
