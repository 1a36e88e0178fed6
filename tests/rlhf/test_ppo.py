"""PPO and GRPO on megatron-core: the reward rises; TP=2 and PP=2 equal TP=1 over the first iteration; DP=2 equals
one rank, and GRPO's groups stay whole at DP=2; a resumed run equals an uninterrupted one; bad input is refused with
one line before any work. Every run checks device placement as a GPU would (runtime/strict.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_patch.runtime import run_on_local_ranks
from tests.rlhf import workers

STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1"}
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("ppo_ws")
    hf_to_mcore(make_hf("ppo_tiny", **TINY), root / "mcore")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{d}{(d + 1) % 10}{(d + 2) % 10}"}) + "\n" for d in range(10)))
    ptx = root / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) + "\n" for _ in range(4)))
    return {"root": root, "ckpt": str(root / "mcore"), "prompts": str(prompts), "ptx": str(ptx)}


def _configs(ws, algo="ppo", cfg_over=None, **rl_over) -> tuple[dict, dict]:
    cfg = {**dict(load=ws["ckpt"], seq_length=16, micro_batch_size=2, global_batch_size=4, train_iters=1, lr=5e-3,
                  lr_decay_style="constant", weight_decay=0.0, log_interval=1), **(cfg_over or {})}
    rl = {**dict(algo=algo, prompt_data_path=ws["prompts"], reward="digits", max_new_tokens=6, ppo_mini_batches=2,
                 critic_lr=5e-3, n_samples_per_prompt=2 if algo == "grpo" else 1), **rl_over}
    return cfg, rl


def _run(world, cfg, rl):
    return run_on_local_ranks(workers.rl_worker, world, cfg, rl, env=STRICT, timeout=600)


@pytest.fixture(scope="module")
def single_rank(ws):
    return _run(1, *_configs(ws, ptx_coef=0.1, ptx_data_path=ws["ptx"]))[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_equals_tp1(ws, single_rank, tp, pp):
    cfg, rl = _configs(ws, cfg_over=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                       ptx_coef=0.1, ptx_data_path=ws["ptx"])
    reference = single_rank
    for got in _run(2, cfg, rl):
        assert got["first"]["responses"] == reference["first"]["responses"]
        for key in ("old_logprob", "ref_logprob", "advantages"):
            np.testing.assert_allclose(got["first"][key], reference["first"][key], rtol=0, atol=1e-4, err_msg=key)
        (_, expected), (_, metrics) = reference["history"][0], got["history"][0]
        for key in ("actor/pg_loss", "actor/first_pg_loss", "actor/entropy", "actor/ptx_loss", "critic/vf_loss",
                    "reward/mean"):
            assert metrics[key] == pytest.approx(expected[key], abs=1e-4), key


def test_data_parallel_equals_one_rank(ws):
    """DP=2 splits each global batch over two ranks. With (near-)greedy sampling both runs roll out the same
    responses, so advantages (whitened over the DP group), batch statistics (reward std, explained variance: over
    the whole batch, not a mean of per-rank ones) and the updates (DDP-averaged gradients) must equal one rank's."""
    cfg, rl = _configs(ws, cfg_over=dict(train_iters=2, micro_batch_size=1), ppo_mini_batches=1, temperature=1e-4)
    one = _run(1, cfg, rl)[0]
    two = _run(2, cfg, rl)
    assert two[0]["first"]["responses"] + two[1]["first"]["responses"] == one["first"]["responses"]
    for key in ("old_logprob", "ref_logprob", "advantages"):
        np.testing.assert_allclose(two[0]["first"][key] + two[1]["first"][key], one["first"][key], rtol=0, atol=1e-4,
                                   err_msg=key)
    for rank in two:
        for (_, expected), (_, got) in zip(one["history"], rank["history"], strict=True):
            for key in expected:
                if not key.startswith("time/"):
                    assert got[key] == pytest.approx(expected[key], abs=1e-4), key


def test_grpo_data_parallel_keeps_groups_whole(ws):
    """GRPO at DP=2 with real sampling (temperature 1: a prompt's samples differ, so advantages are not all 0).
    Checked from what each rank rolled out: a group is the n samples of one prompt, all on one rank, and the ranks'
    prompts are disjoint; a group's advantages are its scores whitened within the group (recomputed here from the
    sampled token ids); the batch metrics are those of the union of both ranks' scores; DDP leaves both ranks with
    the same updated weights."""
    n, prompts_per_rank, max_new_tokens = 4, 2, 6
    cfg, rl = _configs(ws, "grpo", reward="test_low_ids", n_samples_per_prompt=n, max_new_tokens=max_new_tokens)
    ranks = run_on_local_ranks(workers.rl_weights_worker, 2, cfg, rl, env=STRICT, timeout=600)
    rank_prompts, rank_scores = [], []
    for rank in ranks:
        first = rank["first"]
        group_ids = np.array(first["group_ids"])
        groups = {g: np.flatnonzero(group_ids == g) for g in np.unique(group_ids)}
        prompt_of = {g: {tuple(first["prompts"][i]) for i in rows} for g, rows in groups.items()}
        assert len(groups) == prompts_per_rank and all(len(rows) == n for rows in groups.values()), group_ids
        assert all(len(prompts) == 1 for prompts in prompt_of.values()), "a group mixes prompts"
        prompts = set().union(*prompt_of.values())
        assert len(prompts) == prompts_per_rank, "two groups answer the same prompt"
        rank_prompts.append(prompts)

        # test_low_ids pays 1 / max_new_tokens per response token below id 128; GRPO's score is the row's sum.
        mask = np.array(first["response_mask"])
        assert [len(r) for r in first["responses"]] == mask.sum(-1).tolist()
        scores = np.array([sum(t < 128 for t in r) / max_new_tokens for r in first["responses"]])
        expected = np.zeros_like(scores)
        for rows in groups.values():
            expected[rows] = (scores[rows] - scores[rows].mean()) / (scores[rows].std(ddof=1) + 1e-6)
        assert sum(scores[rows].std() > 0 for rows in groups.values()) >= 1, "no group with differing scores"
        np.testing.assert_allclose(first["advantages"], expected[:, None] * mask, rtol=0, atol=1e-5)
        rank_scores.append(scores)
    assert not rank_prompts[0] & rank_prompts[1], "a prompt was rolled out on both ranks"

    union = np.concatenate(rank_scores)
    for rank in ranks:
        (_, metrics), = rank["history"]
        assert metrics["reward/mean"] == pytest.approx(union.mean(), abs=1e-6)
        assert metrics["reward/std"] == pytest.approx(union.std(ddof=1), abs=1e-6)

    before, after, other = ranks[0]["before"], ranks[0]["after"], ranks[1]["after"]
    assert any(not np.array_equal(before[name], after[name]) for name in before), "the update changed nothing"
    for name in after:
        np.testing.assert_array_equal(after[name], other[name], err_msg=name)


def test_resumed_equals_uninterrupted(ws, tmp_path):
    cfg, rl = _configs(ws, cfg_over=dict(train_iters=3), kl_controller="adaptive", kl_target=0.1, kl_horizon=8)
    whole = _run(1, {**cfg, "save": str(tmp_path / "a")}, rl)[0]["history"]
    first = _run(1, {**cfg, "save": str(tmp_path / "b"), "exit_interval": 1}, rl)[0]["history"]
    rest = _run(1, {**cfg, "save": str(tmp_path / "b")}, rl)[0]["history"]
    assert [i for i, _ in first] == [1] and [i for i, _ in rest] == [2, 3]
    for (_, expected), (_, got) in zip(whole, first + rest):
        for key in ("reward/mean", "actor/kl_coef", "actor/kl_sum", "actor/pg_loss", "critic/vf_loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert (tmp_path / "b" / "critic" / "iter_0000003" / "reward_model.json").is_file()


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def other_vocab_ckpt(ws, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    hf_to_mcore(make_hf("ppo_tiny_v640", **{**TINY, "vocab_size": 640}), ws["root"] / "other_vocab")
    return str(ws["root"] / "other_vocab")


BAD_CASES = ["missing_key", "too_long", "other_vocab", "negative_kl", "mini_batches", "adaptive_without_kl_reward",
             "unknown_estimator", "group_of_one", "dual_clip", "missing_answer", "eval_missing_answer",
             "reward_raises", "reward_not_a_number", "reward_missing_function", "eval_with_reward_model"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_refused_before_work(ws, other_vocab_ckpt, tmp_path, case):
    from megatron_patch.errors import MegatronPatchError
    from megatron_patch.rlhf.ppo.config import RLConfig
    from megatron_patch.rlhf.ppo.setup import _validate
    from megatron_patch.training.arguments import TrainConfig

    cfg, rl = _configs(ws, cfg_over=dict(save=str(tmp_path / "out")))
    user = tmp_path / "user_reward.py"
    user.write_text("def boom(prompt, response):\n    return 1 / 0\n\ndef text(prompt, response):\n    return 'yes'\n")
    expected = {
        "missing_key": ("line 1: no key 'prompt' (keys: text)", dict(prompt_data_path=_write(tmp_path / "keys.jsonl",
                                                                                   [{"text": "12"}]))),
        "too_long": ("over the budget", dict(prompt_data_path=_write(tmp_path / "long.jsonl",
                                                                     [{"prompt": "1 2 3 4 5 6 7 8 9 0"}]))),
        "other_vocab": ("--ref-load", dict(ref_load=other_vocab_ckpt)),
        "negative_kl": ("--kl-coef must be >= 0", dict(kl_coef=-0.1)),
        "mini_batches": ("--ppo-mini-batches 8 exceeds the 4 samples", dict(ppo_mini_batches=8)),
        "adaptive_without_kl_reward": ("--kl-controller adaptive steers the KL penalty in the reward",
                                       dict(algo="grpo", n_samples_per_prompt=2, kl_controller="adaptive")),
        "unknown_estimator": ("--adv-estimator must be one of", dict(adv_estimator="ppo")),
        "group_of_one": ("--adv-estimator rloo needs --n-samples-per-prompt >= 2", dict(adv_estimator="rloo")),
        "dual_clip": ("--clip-ratio-c (dual clip) must be > 1", dict(clip_ratio_c=0.5)),
        "missing_answer": ("line 2: no key 'answer'", dict(reward="exact_match", prompt_data_path=_write(
            tmp_path / "answers.jsonl", [{"prompt": "12", "answer": "21"}, {"prompt": "34"}]))),
        "eval_missing_answer": ("held.jsonl: line 1: no key 'answer'", dict(
            reward="exact_match", prompt_data_path=_write(tmp_path / "ok.jsonl", [{"prompt": "12", "answer": "21"}]),
            eval_prompt_data_path=_write(tmp_path / "held.jsonl", [{"prompt": "34"}]))),
        "reward_raises": (f"--reward py:{user}:boom on {ws['prompts']} line 1 raised ZeroDivisionError",
                          dict(reward=f"py:{user}:boom")),
        "reward_not_a_number": (f"--reward py:{user}:text on {ws['prompts']} line 1 returned 'yes'",
                                dict(reward=f"py:{user}:text")),
        "reward_missing_function": (f"{user} has no function 'nope'", dict(reward=f"py:{user}:nope")),
        "eval_with_reward_model": ("--eval-prompt-data-path scores held-out answers with the run's programmatic",
                                   dict(reward=None, reward_model=ws["ckpt"], eval_prompt_data_path=ws["prompts"])),
    }[case]
    with pytest.raises(MegatronPatchError) as error:  # a user error: reported as one line by the CLI
        _validate(TrainConfig.from_dict({"mode": "finetune", **cfg}), RLConfig.from_dict({**rl, **expected[1]}))
    message = str(error.value)
    assert expected[0] in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_held_out_evaluation_before_during_and_after(ws, tmp_path):
    """The loop scores greedy answers to held-out prompts with the run's reward before the first iteration, every
    --eval-interval iterations and at the end; the numbers are those of the held-out answers (recomputed here from
    a greedy pass of the same weights: the first evaluation is the starting checkpoint's)."""
    rows = [{"prompt": f"{d}{(d + 3) % 10}", "answer": f"{(d + 3) % 10}{d}"} for d in range(6)]
    held_out = _write(tmp_path / "held.jsonl", rows)
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"{d}{d}", "answer": f"{d}{d}"} for d in range(4)])
    cfg, rl = _configs(ws, "grpo", cfg_over=dict(train_iters=3, eval_interval=2, tensorboard_dir=str(tmp_path / "tb")),
                       reward="digit_match", prompt_data_path=train, eval_prompt_data_path=held_out)
    result = _run(1, cfg, rl)[0]
    assert [i for i, _ in result["evals"]] == [0, 2, 3]
    for _, metrics in result["evals"]:
        assert set(metrics) == {"eval/reward", "eval/exact_match", "eval/distinct", "eval/length",
                                "eval/reference_distinct"}
        assert 0 <= metrics["eval/exact_match"] <= metrics["eval/reward"] + 1e-9 <= 1 + 1e-9
        assert metrics["eval/distinct"] in {k / 6 for k in range(1, 7)} and metrics["eval/reference_distinct"] == 1.0
    before = run_on_local_ranks(workers.greedy_digit_match_worker, 1, ws["ckpt"], held_out, 6)[0]
    assert result["evals"][0][1]["eval/reward"] == pytest.approx(before, abs=1e-6)
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events written"


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_first_update_is_on_policy(ws, algo):
    """One epoch, one mini-batch: the actor's first update must see ratio == 1 (the old log-probs of the experience
    pass equal the training forward's on the same tokens, positions and mask), so no token is clipped and the
    approximate KL to the rollout policy is 0. A shift between logits and labels, dropout, or different padding
    between the two passes breaks this."""
    cfg, rl = _configs(ws, algo, ppo_mini_batches=1, ppo_epochs=1, temperature=0.7)
    (_, metrics), = _run(1, cfg, rl)[0]["history"]
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0
