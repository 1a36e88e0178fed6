"""core_algos: each function against a hand-written Python loop and a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_patch.rlhf.algos import core_algos as ca

torch.manual_seed(0)


def _random_batch(batch=5, seq=7, seed=0):
    """Random per-token tensors and a response mask whose rows end at different lengths (>= 1 token each)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).float()
    return gen, mask


def _rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t] > 0] for b in range(mask.shape[0])]


# ------------------------------------------------------------------------------------------------ statistics


def test_masked_mean_hand_example():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ca.masked_mean(values, mask).item() == pytest.approx(7 / 3)
    assert ca.masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.5, 4.0])
    assert ca.masked_mean(values, torch.zeros_like(mask), dim=-1).tolist() == [0.0, 0.0]


def test_masked_whiten_hand_example_and_loop():
    assert ca.masked_whiten(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), eps=0).tolist() == pytest.approx([-1, 0, 1])
    gen, mask = _random_batch()
    values = torch.randn(mask.shape, generator=gen)
    picked = [values[b, t].item() for b, ts in enumerate(_rows(mask)) for t in ts]
    mean = sum(picked) / len(picked)
    std = math.sqrt(sum((v - mean) ** 2 for v in picked) / (len(picked) - 1))
    out = ca.masked_whiten(values, mask, eps=0)
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            assert out[b, t].item() == pytest.approx((values[b, t].item() - mean) / std, abs=1e-5)
    kept = ca.masked_whiten(values, mask, shift_mean=False, eps=0)
    assert ca.masked_mean(kept, mask).item() == pytest.approx(mean, abs=1e-5)


def test_masked_var_refuses_too_few_elements_and_group_with_grad():
    with pytest.raises(ValueError, match="at least 2 valid elements"):
        ca.masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="for statistics"):
        ca.masked_mean(torch.ones(2, requires_grad=True), torch.ones(2), group=object())


def test_masked_whiten_over_a_group_equals_whitening_the_concatenation():
    from megatron_patch.runtime import run_on_local_ranks
    from tests.rlhf import workers

    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 3, 5, generator=gen)
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                         [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]], dtype=torch.float32)
    results = run_on_local_ranks(workers.whiten_over_group_worker, 2, values.tolist(), mask.tolist(), timeout=180)
    expected = ca.masked_whiten(values.reshape(6, 5), mask.reshape(6, 5)).reshape(2, 3, 5)
    for rank, (whitened, mean) in enumerate(results):
        got = torch.tensor(whitened) * mask[rank]
        torch.testing.assert_close(got, expected[rank] * mask[rank], atol=1e-6, rtol=0)
        assert mean == pytest.approx(ca.masked_mean(values, mask).item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_hand_example():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert ca.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert ca.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert ca.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)


def test_kl_estimators_loop_and_clamp():
    gen = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(4, 6, generator=gen) * 3, torch.randn(4, 6, generator=gen) * 3
    for name, formula in {
        "k1": lambda p, q: p - q,
        "k2": lambda p, q: 0.5 * (p - q) ** 2,
        "k3": lambda p, q: math.exp(q - p) - (q - p) - 1,
    }.items():
        out = ca.kl_penalty(logp, ref, name, clamp=2.0)
        for b in range(4):
            for t in range(6):
                expected = min(max(formula(logp[b, t].item(), ref[b, t].item()), -2.0), 2.0)
                assert out[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # k3 stays finite where exp(ref - logp) would overflow fp32
    assert torch.isfinite(ca.kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3", clamp=None)).all()


def test_kl_registry_lists_names_and_refuses_a_second_registration():
    assert ca.kl_estimator_names() == ["k1", "k2", "k3"]
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4' \(valid: k1, k2, k3\)"):
        ca.get_kl_estimator("k4")
    with pytest.raises(ValueError, match="registered twice"):
        ca.register_kl_estimator("k1")(lambda p, q: p)


def test_kl_shaped_rewards_loop():
    gen, mask = _random_batch(seed=2)
    logp, ref = torch.randn(mask.shape, generator=gen), torch.randn(mask.shape, generator=gen)
    scores = torch.randn(mask.shape[0], generator=gen)
    rewards, metrics = ca.compute_kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.3, estimator="k1",
                                                    kl_clamp=None)
    kl_sums = []
    for b, ts in enumerate(_rows(mask)):
        for t in range(mask.shape[1]):
            expected = 0.0
            if t in ts:
                expected = -0.3 * (logp[b, t].item() - ref[b, t].item()) + (scores[b].item() if t == ts[-1] else 0)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
        kl_sums.append(sum(logp[b, t].item() - ref[b, t].item() for t in ts))
    assert metrics["actor/reward_kl_sum"].item() == pytest.approx(sum(kl_sums) / len(kl_sums), abs=1e-5)
    assert metrics["actor/reward_kl_penalty_coeff"].item() == pytest.approx(0.3)


def test_score_lands_on_the_last_valid_token_and_empty_rows_are_refused():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert ca.scores_to_token_rewards(torch.tensor([2.0, 5.0]), mask).tolist() == [[0, 0, 2, 0], [5, 0, 0, 0]]
    with pytest.raises(ValueError, match="no valid token"):
        ca.scores_to_token_rewards(torch.tensor([2.0, 5.0]), torch.tensor([[1, 0], [0, 0]]))


# ------------------------------------------------------------------------------------------------ advantages


def _gae_loop(rewards, values, mask, gamma, lam):
    advantages = [[0.0] * len(r) for r in rewards]
    returns = [[0.0] * len(r) for r in rewards]
    for b, ts in enumerate(_rows(mask)):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(ts):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b][t]
            advantages[b][t], returns[b][t] = next_adv, next_adv + values[b][t]
    return torch.tensor(advantages), torch.tensor(returns)


def test_gae_hand_example():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = ca.compute_gae_advantage_return(rewards, values, torch.ones(1, 3), 0.5, 0.5, whiten=False)
    assert adv[0].tolist() == pytest.approx([-0.28125, -0.125, 0.5])
    assert ret[0].tolist() == pytest.approx([0.21875, 0.375, 1.0])


def test_gae_loop_and_nothing_past_eos():
    gen, mask = _random_batch(seed=4)
    rewards, values = torch.randn(mask.shape, generator=gen), torch.randn(mask.shape, generator=gen)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, 0.9, 0.8, whiten=False)
    ref_adv, ref_ret = _gae_loop(rewards.tolist(), values.tolist(), mask, 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=0)
    junk = 1 - mask
    adv2, ret2 = ca.compute_gae_advantage_return(rewards + 99 * junk, values - 7 * junk, mask, 0.9, 0.8, whiten=False)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    whitened, _ = ca.compute_gae_advantage_return(rewards, values, mask, 0.9, 0.8, whiten=True)
    torch.testing.assert_close(whitened, ca.masked_whiten(ref_adv, mask) * mask, atol=1e-5, rtol=0)
    assert (whitened[mask == 0] == 0).all()


def test_grpo_hand_example_and_loop():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])
    group_ids = torch.tensor([7, 7, 7, 7, 2, 2])
    adv, ret = ca.compute_grpo_outcome_advantage(ca.scores_to_token_rewards(scores, mask), mask, group_ids, eps=0)
    s = math.sqrt(3) / 2  # group 7: mean 0.5, unbiased std sqrt(1/3); group 2: mean 4, std sqrt(2)
    assert adv[:, 0].tolist() == pytest.approx([s, -s, -s, s, -1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert torch.equal(adv, ret) and (adv[mask == 0] == 0).all()
    for b in range(6):
        members = [scores[i].item() for i in range(6) if group_ids[i] == group_ids[b]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
        expected = (scores[b].item() - mean) / (std + 1e-6)
        got, _ = ca.compute_grpo_outcome_advantage(ca.scores_to_token_rewards(scores, mask), mask, group_ids)
        assert got[b, 0].item() == pytest.approx(expected, abs=1e-5)
        unnormed, _ = ca.compute_grpo_outcome_advantage(ca.scores_to_token_rewards(scores, mask), mask, group_ids,
                                                        norm_by_std=False)
        assert unnormed[b, 0].item() == pytest.approx(scores[b].item() - mean, abs=1e-6)


def test_grpo_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ca.compute_grpo_outcome_advantage(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([0, 0, 1]))


def test_adv_estimator_registry():
    assert ca.adv_estimator_names() == ["dr_grpo", "gae", "grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                        "rloo"]
    config = ca.AdvantageConfig(gamma=0.5, lam=0.5, whiten=False)
    adv, _ = ca.get_adv_estimator("gae")(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), config,
                                         values=torch.full((1, 3), 0.5))
    assert adv[0].tolist() == pytest.approx([-0.28125, -0.125, 0.5])
    with pytest.raises(ValueError, match="needs the critic's values"):
        ca.get_adv_estimator("gae")(torch.ones(1, 3), torch.ones(1, 3), config)
    with pytest.raises(ValueError, match="needs group_ids"):
        ca.get_adv_estimator("grpo")(torch.ones(1, 3), torch.ones(1, 3), config)
    with pytest.raises(ValueError, match=r"valid: dr_grpo, gae, grpo"):
        ca.get_adv_estimator("ppo")
    with pytest.raises(ValueError, match="registered twice"):
        ca.register_adv_estimator("gae")(lambda *a, **k: None)


# ------------------------------------------------------------------------------------------------ aggregation


def test_aggregate_loss_hand_example():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert ca.aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.5)
    assert ca.aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)
    assert ca.aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert ca.aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    with pytest.raises(ValueError, match="valid: token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        ca.aggregate_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_aggregate_loss_is_invariant_to_the_micro_batch_split(mode):
    gen, mask = _random_batch(batch=6, seq=9, seed=5)
    mask[4] = 0  # a row with no token counts neither as tokens nor as a sequence
    loss = torch.randn(mask.shape, generator=gen)
    full = ca.aggregate_loss(loss, mask, mode)
    # the loop: every mode from its definition
    rows = [ts for ts in _rows(mask) if ts]
    if mode == "token-mean":
        expected = sum(loss[b, t].item() for b, ts in enumerate(_rows(mask)) for t in ts) / sum(map(len, rows))
    else:
        divisor = {"seq-mean-token-sum": lambda ts: 1, "seq-mean-token-mean": len,
                   "seq-mean-token-sum-norm": lambda ts: mask.shape[1]}[mode]
        per_seq = [sum(loss[b, t].item() for t in ts) / divisor(ts) for b, ts in enumerate(_rows(mask)) if ts]
        expected = sum(per_seq) / len(per_seq)
    assert full.item() == pytest.approx(expected, abs=1e-5)
    for split in ([2, 1, 3], [1, 5], [6], [1] * 6):
        pieces = torch.split(torch.arange(6), split)
        counts = [ca.count_tokens_and_sequences(mask[idx]) for idx in pieces]
        num_tokens, num_seqs = sum(c[0] for c in counts), sum(c[1] for c in counts)
        total = sum(ca.aggregate_loss(loss[idx], mask[idx], mode, num_tokens, num_seqs) for idx in pieces)
        assert total.item() == pytest.approx(full.item(), abs=1e-5)
    # Without the global normalisers, averaging micro-batch losses is not the mini-batch loss (why they exist).
    naive = sum(ca.aggregate_loss(loss[idx], mask[idx], mode) for idx in torch.split(torch.arange(6), [1, 5])) / 2
    assert abs(naive.item() - full.item()) > 1e-3


# ------------------------------------------------------------------------------------------------ PPO losses


def _policy_loss_loop(old, new, adv, mask, low, high, c):
    total, clipped_tokens, n = 0.0, 0, 0
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            a, ratio = adv[b][t], math.exp(new[b][t] - old[b][t])
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
            token = max(unclipped, clipped)
            clipped_tokens += clipped > unclipped
            if c is not None and a < 0:
                token = min(token, -a * c)
            total, n = total + token, n + 1
    return total / n, clipped_tokens / n


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_loop(dual_clip):
    gen, mask = _random_batch(seed=6)
    old = torch.randn(mask.shape, generator=gen)
    new = (old + torch.randn(mask.shape, generator=gen) * 0.8).requires_grad_()
    adv = torch.randn(mask.shape, generator=gen) * 2
    loss, metrics = ca.compute_policy_loss(old, new, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                           clip_ratio_c=dual_clip)
    expected, clipfrac = _policy_loss_loop(old.tolist(), new.tolist(), adv.tolist(), mask, 0.2, 0.28, dual_clip)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(clipfrac, abs=1e-6)
    assert metrics["actor/ppo_kl"].item() == pytest.approx(ca.masked_mean(old - new, mask).item(), abs=1e-6)
    loss.backward()
    assert (new.grad[mask == 0] == 0).all() and new.grad.abs().sum() > 0


def test_policy_loss_hand_example():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 5.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8; token 2: max(5, 1.2) = 5 (no dual clip)
    loss, metrics = ca.compute_policy_loss(old, new, adv, mask, clip_ratio=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 5.0) / 3)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 3)
    loss, metrics = ca.compute_policy_loss(old, new, adv, mask, clip_ratio=0.2, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 3.0) / 3)  # token 2 capped at -A * 3
    assert metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="must be > 1"):
        ca.compute_policy_loss(old, new, adv, mask, clip_ratio_c=0.9)


def test_value_loss_hand_example_and_loop():
    loss, metrics = ca.compute_value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]),
                                          torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)  # clipped prediction 1.2 is further from 2.0 than 1.5
    assert metrics["critic/vf_clipfrac"].item() == 1.0
    gen, mask = _random_batch(seed=7)
    values, old, returns = (torch.randn(mask.shape, generator=gen) for _ in range(3))
    loss, _ = ca.compute_value_loss(values, old, returns, mask, clip_range=0.3)
    terms = []
    for b, ts in enumerate(_rows(mask)):
        for t in ts:
            v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            clipped = o + min(max(v - o, -0.3), 0.3)
            terms.append(0.5 * max((v - r) ** 2, (clipped - r) ** 2))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_explained_variance_hand_example():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert ca.explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    assert ca.explained_variance(torch.full((1, 3), 2.0), returns, torch.ones(1, 3)).item() == pytest.approx(0.0)


def test_entropy_and_logprobs_hand_example_and_loop():
    uniform = torch.zeros(1, 1, 4)
    assert ca.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    assert ca.logprobs_from_logits(uniform, torch.tensor([[2]])).item() == pytest.approx(math.log(0.25))
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 5, generator=gen)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    ent, lp = ca.entropy_from_logits(logits), ca.logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].tolist()
            norm = math.log(sum(math.exp(v) for v in z))
            probs = [math.exp(v - norm) for v in z]
            assert ent[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-5)
            assert lp[b, t].item() == pytest.approx(z[labels[b, t]] - norm, abs=1e-5)
    loss, metrics = ca.compute_entropy_loss(ent, torch.ones(2, 3))
    assert metrics["actor/entropy"].item() == pytest.approx(ent.mean().item())


def test_kl_loss_is_the_aggregated_k3():
    logp, ref = torch.tensor([[math.log(0.5), 0.0]]), torch.tensor([[math.log(0.25), 0.0]])
    loss, metrics = ca.compute_kl_loss(logp, ref, torch.tensor([[1, 0]]), estimator="k3")
    assert loss.item() == pytest.approx(0.5 + math.log(2) - 1)


# ------------------------------------------------------------------------------------------------ controllers


def test_kl_controllers():
    fixed = ca.build_kl_controller("fixed", 0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    adaptive = ca.build_kl_controller("adaptive", 0.1, target_kl=6.0, horizon=10000)
    adaptive.update(12.0, 256)  # error 1.0 clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    value = adaptive.value
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(value * (1 - 0.1 * 100 / 10000))
    restored = ca.build_kl_controller("adaptive", 0.1, target_kl=6.0, horizon=10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    with pytest.raises(ValueError, match="valid: adaptive, fixed"):
        ca.build_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="needs target_kl and horizon"):
        ca.build_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        ca.build_kl_controller("fixed", -1.0)


# ------------------------------------------------------------------------------------------------ preferences


def test_pairwise_reward_loss_hand_example_and_loop():
    loss, metrics = ca.compute_pairwise_reward_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    assert metrics["rm/accuracy"].item() == 0.5 and metrics["rm/margin"].item() == pytest.approx(-0.5)
    gen = torch.Generator().manual_seed(9)
    chosen, rejected, margin = (torch.randn(6, generator=gen) for _ in range(3))
    loss, _ = ca.compute_pairwise_reward_loss(chosen, rejected, margin)
    expected = sum(math.log(1 + math.exp(-(c - r - m))) for c, r, m in zip(chosen.tolist(), rejected.tolist(),
                                                                        margin.tolist())) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    halves = [ca.compute_pairwise_reward_loss(chosen[i], rejected[i], margin[i], num_pairs=6)[0]
              for i in (slice(0, 2), slice(2, 6))]
    assert sum(halves).item() == pytest.approx(loss.item(), abs=1e-6)


def test_dpo_loss_hand_example_and_loop():
    loss, metrics = ca.compute_dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                        torch.tensor([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert metrics["dpo/rewards_chosen"].item() == pytest.approx(0.25)
    assert metrics["dpo/rewards_rejected"].item() == pytest.approx(-0.25)
    assert metrics["dpo/reward_accuracy"].item() == 1.0 and metrics["dpo/reward_margin"].item() == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(10)
    pc, pr, rc, rr = (torch.randn(5, generator=gen) * 3 for _ in range(4))
    pc.requires_grad_()
    loss, _ = ca.compute_dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    expected = 0.0
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = 0.2 * ((a - c) - (b - d))
        expected += -0.9 * math.log(1 / (1 + math.exp(-h))) - 0.1 * math.log(1 / (1 + math.exp(h)))
    assert loss.item() == pytest.approx(expected / 5, abs=1e-6)
    loss.backward()
    assert pc.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="beta must be > 0"):
        ca.compute_dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_shape_mismatch_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"shapes differ: old_logprob \(2, 3\), logprob \(2, 4\)"):
        ca.compute_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3))
