"""The advantage estimators added next to GAE and GRPO (RLOO, REINFORCE++, REINFORCE++ with a baseline, Dr. GRPO),
each against an independent implementation written here from its paper's formula: plain Python loops over rows and
groups, no tensor code shared with core_algos."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_patch.rlhf.algos import core_algos as ca


def _batch(seed=0, batch=8, seq=6, groups=3):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(batch, seq, generator=gen, dtype=torch.float64) * mask
    group_ids = torch.tensor([b % groups for b in range(batch)])
    return rewards, mask, group_ids


def _row_scores(rewards, mask):
    return [sum(rewards[b, t].item() for t in range(rewards.shape[1]) if mask[b, t]) for b in range(rewards.shape[0])]


def _members(group_ids):
    out = {}
    for b, g in enumerate(group_ids.tolist()):
        out.setdefault(g, []).append(b)
    return out


def _whiten(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + 1e-8) for v in values]


def _check(got, expected_rows, mask):
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            want = expected_rows[b][t] if mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-6), (b, t)


def test_rloo_is_score_minus_the_mean_of_the_others():
    rewards, mask, group_ids = _batch()
    scores = _row_scores(rewards, mask)
    members = _members(group_ids)
    expected = []
    for b, g in enumerate(group_ids.tolist()):
        others = [scores[o] for o in members[g] if o != b]
        expected.append([scores[b] - sum(others) / len(others)] * mask.shape[1])
    adv, returns = ca.get_adv_estimator("rloo")(rewards, mask, ca.AdvantageConfig(), group_ids=group_ids)
    _check(adv, expected, mask)
    assert torch.equal(adv, returns)


def test_dr_grpo_is_grpo_without_the_std():
    rewards, mask, group_ids = _batch(seed=1)
    scores = _row_scores(rewards, mask)
    members = _members(group_ids)
    expected = [[scores[b] - sum(scores[o] for o in members[g]) / len(members[g])] * mask.shape[1]
                for b, g in enumerate(group_ids.tolist())]
    config = ca.AdvantageConfig(norm_by_std=True)  # dr_grpo ignores it: never divides
    adv, _ = ca.get_adv_estimator("dr_grpo")(rewards, mask, config, group_ids=group_ids)
    _check(adv, expected, mask)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_is_the_whitened_return_to_go(gamma):
    rewards, mask, _ = _batch(seed=2)
    returns = []
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        row = [0.0] * mask.shape[1]
        for t in valid:
            row[t] = sum(gamma ** (k - t) * rewards[b, k].item() for k in valid if k >= t)
        returns.append(row)
    flat = [returns[b][t] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    whitened = iter(_whiten(flat))
    expected = [[next(whitened) if mask[b, t] else 0.0 for t in range(mask.shape[1])] for b in range(mask.shape[0])]
    adv, raw = ca.get_adv_estimator("reinforce_plus_plus")(rewards, mask, ca.AdvantageConfig(gamma=gamma))
    _check(adv, expected, mask)
    _check(raw, returns, mask)


def test_reinforce_plus_plus_baseline_is_the_whitened_group_centred_score():
    rewards, mask, group_ids = _batch(seed=3)
    scores = _row_scores(rewards, mask)
    members = _members(group_ids)
    centred = [scores[b] - sum(scores[o] for o in members[g]) / len(members[g]) for b, g in enumerate(group_ids.tolist())]
    flat = [centred[b] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    whitened = iter(_whiten(flat))
    expected = [[next(whitened) if mask[b, t] else 0.0 for t in range(mask.shape[1])] for b in range(mask.shape[0])]
    adv, _ = ca.get_adv_estimator("reinforce_plus_plus_baseline")(rewards, mask, ca.AdvantageConfig(),
                                                                  group_ids=group_ids)
    _check(adv, expected, mask)


@pytest.mark.parametrize("name", ["rloo", "dr_grpo", "reinforce_plus_plus_baseline"])
def test_group_estimators_need_groups_of_two(name):
    with pytest.raises(ValueError, match="needs group_ids"):
        ca.get_adv_estimator(name)(torch.ones(2, 3), torch.ones(2, 3), ca.AdvantageConfig())
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ca.get_adv_estimator(name)(torch.ones(3, 2), torch.ones(3, 2), ca.AdvantageConfig(),
                                   group_ids=torch.tensor([0, 0, 1]))


def test_ptx_rows_differ_per_data_parallel_rank():
    from megatron_patch.rlhf.ppo.loop import ptx_position

    rows = 6
    read = [set(range(ptx_position(step, 2, rank, rows), ptx_position(step, 2, rank, rows) + rows))
            for step in range(3) for rank in range(2)]
    assert set().union(*read) == set(range(3 * 2 * rows))  # every row once: the ranks and steps never overlap
    assert sum(map(len, read)) == 3 * 2 * rows
