"""The RL math of RLHF as pure tensor functions: no model, no optimizer, no collective unless a group is passed in.

Conventions (shared by every function here):
  - Per-token tensors are ``(batch, seq)`` over the *response* positions: ``logprob[b, t]`` is the log-probability
    of response token ``t`` of sample ``b``; ``response_mask[b, t]`` is 1 for a real response token (up to and
    including EOS) and 0 for padding after it. Masks hold 0/1 (bool or float).
  - Losses come back as ``(loss, metrics)``; ``metrics`` maps namespaced keys (``actor/...``, ``critic/...``,
    ``rm/...``, ``dpo/...``) to detached 0-d tensors on the input's device (logged with ``.item()`` by the caller,
    so no host sync happens inside the math).
  - Callers pass fp32 tensors (log-probs, values); nothing here changes the dtype.

Loss aggregation and micro-batches: a mini-batch is often split into micro-batches (gradient accumulation, pipeline
schedules) and over data-parallel ranks. ``aggregate_loss`` takes the normalisers of the *whole* mini-batch
(``num_tokens`` / ``num_seqs``, from ``count_tokens_and_sequences`` summed over micro-batches and ranks): then the
micro-batch losses *sum* to the loss of the whole mini-batch, whatever the split. A schedule that averages
micro-batch losses (megatron-core divides by the number of micro-batches) or a data-parallel wrapper that averages
gradients over ranks must be compensated by the caller (multiply by that count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...registry import Registry

Tensor = torch.Tensor

# exp() of a log-ratio beyond this overflows fp32 or makes a ratio meaningless; verl and TRL clamp alike.
_LOG_RATIO_LIMIT = 20.0

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes differ: {listed}")


def _metric(value: Tensor) -> Tensor:
    return value.detach()


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1, over ``dim`` (all elements when None)."""
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def _global_sums(sums: list[Tensor], group) -> list[Tensor]:
    """All-reduce (sum) a few scalars in one collective; float64 so counts and sums stay exact."""
    if group is None:
        return sums
    stacked = torch.stack([s.to(torch.float64) for s in sums])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return [v.to(s.dtype) for v, s in zip(stacked.unbind(0), sums)]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, group=None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1.

    Args:
        values: any shape, e.g. ``(batch, seq)``.
        mask: same shape, 0/1.
        dim: reduce only this dimension (a row with no valid element gives 0); None reduces everything.
        group: a process group (e.g. data-parallel) to take the mean over all ranks' elements. Statistics only:
            the all-reduce carries no gradient, so ``values`` must not require grad (aggregate a loss with
            ``aggregate_loss`` and global normalisers instead).
    """
    _check_shapes(values=values, mask=mask)
    if group is not None:
        if dim is not None:
            raise ValueError("masked_mean over a process group reduces all elements; pass dim=None")
        if values.requires_grad:
            raise ValueError("masked_mean over a process group is for statistics; detach values, or aggregate "
                             "a loss with aggregate_loss and global normalisers")
    total = masked_sum(values, mask, dim)
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    if dim is None:
        total, count = _global_sums([total, count], group)
    return total / count.clamp(min=1)


def _masked_mean_var(values: Tensor, mask: Tensor, unbiased: bool, group) -> tuple[Tensor, Tensor]:
    mean = masked_mean(values, mask, group=group)
    centered_sq = (values - mean) ** 2
    total, count = _global_sums([masked_sum(centered_sq, mask), mask.to(values.dtype).sum()], group)
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid elements, got {int(count)}")
    return mean, total / (count - 1 if unbiased else count)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, group=None) -> Tensor:
    """Variance of ``values`` where ``mask`` is 1 (Bessel-corrected when ``unbiased``), optionally over a group."""
    return _masked_mean_var(values, mask, unbiased, group)[1]


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, group=None, eps: float = 1e-8) -> Tensor:
    """``(values - mean) / std`` with mean and (unbiased) std over the valid elements, optionally over a group.

    Elements where ``mask`` is 0 are transformed too but meaningless; multiply by the mask if they must be 0.
    With ``shift_mean=False`` the mean is added back (only the scale changes), as PPO implementations do for
    rewards.
    """
    mean, var = _masked_mean_var(values, mask, True, group)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# --------------------------------------------------------------------------------------------------------------
# KL estimators (registry) and the KL-shaped reward
# --------------------------------------------------------------------------------------------------------------

KLEstimator = Callable[[Tensor, Tensor], Tensor]
_KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Decorator: register ``fn(logprob, ref_logprob) -> per-token KL estimate`` under ``name``."""
    return _KL_ESTIMATORS.register(name)


def get_kl_estimator(name: str) -> KLEstimator:
    return _KL_ESTIMATORS.get(name)


def kl_estimator_names() -> list[str]:
    return _KL_ESTIMATORS.names()


@register_kl_estimator("k1")
def kl_k1(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    """``log p - log q``: unbiased for KL(p || ref) under samples of p, high variance, can be negative."""
    return logprob - ref_logprob


@register_kl_estimator("k2")
def kl_k2(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    """``0.5 (log p - log q)^2``: biased, low variance, non-negative (Schulman's k2)."""
    return 0.5 * (logprob - ref_logprob) ** 2


@register_kl_estimator("k3")
def kl_k3(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    """``q/p - log(q/p) - 1``: unbiased and non-negative (Schulman's k3, GRPO's KL loss)."""
    log_ratio = (ref_logprob - logprob).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return torch.exp(log_ratio) - log_ratio - 1


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, estimator: str = "k3", clamp: float | None = 10.0) -> Tensor:
    """Per-token KL estimate between the policy and the reference, clamped to ``[-clamp, clamp]``.

    The clamp bounds the damage of a single token whose log-probabilities diverge (a rare token sampled at high
    temperature) on the reward or the loss; it also stops that token's gradient.

    Args:
        logprob: ``(batch, seq)`` log-probs of the sampled tokens under the policy.
        ref_logprob: ``(batch, seq)`` the same under the reference model.
        estimator: a registered name (``k1``, ``k2``, ``k3``).
        clamp: bound on the absolute value; None for no clamp.

    Returns:
        ``(batch, seq)`` estimate, unmasked.
    """
    _check_shapes(logprob=logprob, ref_logprob=ref_logprob)
    kl = get_kl_estimator(estimator)(logprob, ref_logprob)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def last_token_index(response_mask: Tensor) -> Tensor:
    """``(batch,)`` index of the last valid token of each row; raises if a row has none."""
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    last = torch.where(response_mask.bool(), positions, -1).max(dim=-1).values
    if (last < 0).any():
        raise ValueError(f"{int((last < 0).sum())} response(s) have no valid token (empty response_mask row)")
    return last


def scores_to_token_rewards(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Place each sequence's scalar score on its last valid response token.

    Args:
        scores: ``(batch,)`` outcome scores (reward model or a programmatic reward).
        response_mask: ``(batch, seq)``.

    Returns:
        ``(batch, seq)`` zeros except ``scores[b]`` at the last valid position of row ``b``.
    """
    if scores.shape != response_mask.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} do not match the batch of response_mask "
                         f"{tuple(response_mask.shape)}")
    rewards = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    return rewards.scatter(1, last_token_index(response_mask)[:, None], scores[:, None])


def compute_kl_shaped_rewards(
    scores: Tensor,
    logprob: Tensor,
    ref_logprob: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    kl_clamp: float | None = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """InstructGPT's per-token reward: ``-kl_coef * KL_t`` on every response token, plus the score on the last one.

    Args:
        scores: ``(batch,)``.
        logprob, ref_logprob, response_mask: ``(batch, seq)``; log-probs of the rollout under the (old) policy
            and the reference.
        kl_coef: the KL coefficient (from a KL controller), >= 0.
        estimator, kl_clamp: see ``kl_penalty``.

    Returns:
        ``(token_level_rewards (batch, seq), metrics)``; metrics: ``actor/reward_kl_penalty`` (token-mean KL per
        sequence, averaged over the batch), ``actor/reward_kl_sum`` (KL summed per sequence, averaged: the value
        Ziegler et al.'s adaptive controller targets), ``actor/reward_kl_penalty_coeff``.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = response_mask.to(logprob.dtype)
    kl = kl_penalty(logprob, ref_logprob, estimator, kl_clamp) * mask
    rewards = scores_to_token_rewards(scores.to(logprob.dtype), response_mask) - kl_coef * kl
    metrics = {
        "actor/reward_kl_penalty": _metric(masked_mean(kl, mask, dim=-1).mean()),
        "actor/reward_kl_sum": _metric(kl.sum(-1).mean()),
        "actor/reward_kl_penalty_coeff": torch.tensor(float(kl_coef), device=logprob.device),
    }
    return rewards, metrics


# --------------------------------------------------------------------------------------------------------------
# Advantage estimators (registry)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageConfig:
    """Knobs of the advantage estimators (each estimator reads the ones it needs).

    Attributes:
        gamma: discount (gae).
        lam: GAE's lambda (gae).
        whiten: whiten GAE advantages over the batch (gae).
        norm_by_std: divide by the group's std (grpo; False gives Dr. GRPO's mean-only baseline).
        eps: added to the std before dividing (grpo).
    """

    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    norm_by_std: bool = True
    eps: float = 1e-6


AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
_ADV_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_adv_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(token_level_rewards, response_mask, config, *, values=None, group_ids=None,
    dp_group=None) -> (advantages, returns)`` under ``name``."""
    return _ADV_ESTIMATORS.register(name)


def get_adv_estimator(name: str) -> AdvantageEstimator:
    return _ADV_ESTIMATORS.get(name)


def adv_estimator_names() -> list[str]:
    return _ADV_ESTIMATORS.names()


@torch.no_grad()
def compute_gae_advantage_return(
    token_level_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
    dp_group=None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, where ``t+1`` is the next
    *valid* token: masked positions are skipped, so rewards and values after EOS never reach a valid token, and
    the last valid token bootstraps from 0 (the episode ends at EOS).

    Args:
        token_level_rewards: ``(batch, seq)``.
        values: ``(batch, seq)`` critic values of the rollout.
        response_mask: ``(batch, seq)``.
        gamma, lam: discount and GAE lambda in [0, 1].
        whiten: whiten the advantages over the valid tokens (of the batch, or of ``dp_group`` when given).
        dp_group: data-parallel group for the whitening statistics.

    Returns:
        ``(advantages, returns)``, each ``(batch, seq)`` and 0 at masked positions; ``returns = A + V`` before
        whitening (the critic's target).
    """
    _check_shapes(token_level_rewards=token_level_rewards, values=values, response_mask=response_mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = response_mask.to(values.dtype)
    rewards = token_level_rewards.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        valid = mask[:, t]
        # A masked position passes the next valid token's value and advantage through unchanged.
        next_value = valid * values[:, t] + (1 - valid) * next_value
        next_advantage = valid * advantage + (1 - valid) * next_advantage
        reversed_advantages.append(advantage * valid)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask, group=dp_group) * mask
    return advantages, returns


@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO's outcome advantage: each sample's score relative to the other samples of its prompt.

    ``A_b = (s_b - mean_g) / (std_g + eps)`` with ``s_b`` the sum of the row's rewards and mean/std (unbiased)
    over the samples sharing ``group_ids[b]``; the same ``A_b`` on every valid token of the row.

    Args:
        token_level_rewards: ``(batch, seq)`` (the score on the last token, see ``scores_to_token_rewards``).
        response_mask: ``(batch, seq)``.
        group_ids: ``(batch,)`` integer id of each sample's prompt; every group needs at least 2 samples.
        norm_by_std: divide by the group's std (False: subtract the mean only, as Dr. GRPO does).
        eps: added to the std so a group of equal scores gives advantage 0, not NaN.

    Returns:
        ``(advantages, returns)``, both ``(batch, seq)``, equal (GRPO has no critic), 0 at masked positions.
    """
    _check_shapes(token_level_rewards=token_level_rewards, response_mask=response_mask)
    if group_ids.shape != token_level_rewards.shape[:1]:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} do not match the batch {token_level_rewards.shape[0]}")
    mask = response_mask.to(token_level_rewards.dtype)
    scores = (token_level_rewards * mask).sum(-1)
    _, member_of, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (sizes < 2).any():
        raise ValueError("GRPO needs at least 2 samples per prompt; some group has 1 (raise the samples per prompt)")
    sizes = sizes.to(scores.dtype)
    group_sum = torch.zeros_like(sizes).index_add_(0, member_of, scores)
    deviation = scores - (group_sum / sizes)[member_of]
    group_var = torch.zeros_like(sizes).index_add_(0, member_of, deviation**2) / (sizes - 1)
    advantage = deviation / (group_var.sqrt()[member_of] + eps) if norm_by_std else deviation
    advantages = advantage[:, None] * mask
    return advantages, advantages


@register_adv_estimator("gae")
def _gae_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None, group_ids=None,
                   dp_group=None):
    if values is None:
        raise ValueError("the 'gae' advantage estimator needs the critic's values")
    return compute_gae_advantage_return(token_level_rewards, values, response_mask, config.gamma, config.lam,
                                        config.whiten, dp_group)


@register_adv_estimator("grpo")
def _grpo_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None, group_ids=None,
                    dp_group=None):
    if group_ids is None:
        raise ValueError("the 'grpo' advantage estimator needs group_ids (which prompt each sample answers)")
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, group_ids, config.norm_by_std,
                                          config.eps)


def _group_statistics(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(member_of, sizes, group_sum)``: each sample's group index, each group's size and score sum."""
    _, member_of, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (sizes < 2).any():
        raise ValueError("a group estimator needs at least 2 samples per prompt; some group has 1 (raise the "
                         "samples per prompt)")
    sizes = sizes.to(scores.dtype)
    return member_of, sizes, torch.zeros_like(sizes).index_add_(0, member_of, scores)


@torch.no_grad()
def compute_rloo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                   group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024): each sample's score minus the mean score of the *other* samples of its prompt,
    ``A_b = s_b - (sum_g - s_b) / (n_g - 1)``, on every valid token of the row (``s_b`` the row's reward sum).

    Returns ``(advantages, returns)``, both ``(batch, seq)``, equal, 0 at masked positions.
    """
    _check_shapes(token_level_rewards=token_level_rewards, response_mask=response_mask)
    mask = response_mask.to(token_level_rewards.dtype)
    scores = (token_level_rewards * mask).sum(-1)
    member_of, sizes, group_sum = _group_statistics(scores, group_ids)
    baseline = (group_sum[member_of] - scores) / (sizes[member_of] - 1)
    advantages = (scores - baseline)[:, None] * mask
    return advantages, advantages


@torch.no_grad()
def compute_reinforce_plus_plus_advantage(token_level_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0,
                                          dp_group=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): the discounted return-to-go of each token, ``G_t = r_t + gamma G_{t+1}`` (0 after the
    last valid token), whitened over the valid tokens of the batch (of every rank of ``dp_group``).

    Returns ``(advantages, returns)``: the whitened and the raw returns, ``(batch, seq)``, 0 at masked positions.
    """
    _check_shapes(token_level_rewards=token_level_rewards, response_mask=response_mask)
    mask = response_mask.to(token_level_rewards.dtype)
    rewards = token_level_rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    returns = returns * mask
    return masked_whiten(returns, mask, group=dp_group) * mask, returns


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                   group_ids: Tensor, dp_group=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with a baseline: each sample's score minus its group's mean score, put on every valid token and
    whitened over the valid tokens of the batch (of every rank of ``dp_group``).

    Returns ``(advantages, returns)``: the whitened and the centred scores per token, 0 at masked positions.
    """
    _check_shapes(token_level_rewards=token_level_rewards, response_mask=response_mask)
    mask = response_mask.to(token_level_rewards.dtype)
    scores = (token_level_rewards * mask).sum(-1)
    member_of, sizes, group_sum = _group_statistics(scores, group_ids)
    centred = (scores - (group_sum / sizes)[member_of])[:, None] * mask
    return masked_whiten(centred, mask, group=dp_group) * mask, centred


def _needs_groups(name: str, group_ids) -> None:
    if group_ids is None:
        raise ValueError(f"the '{name}' advantage estimator needs group_ids (which prompt each sample answers)")


@register_adv_estimator("dr_grpo")
def _dr_grpo_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None, group_ids=None,
                       dp_group=None):
    """Dr. GRPO (Liu et al. 2025): GRPO's group baseline without the division by the group's std."""
    _needs_groups("dr_grpo", group_ids)
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, group_ids, False, config.eps)


@register_adv_estimator("rloo")
def _rloo_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None, group_ids=None,
                    dp_group=None):
    _needs_groups("rloo", group_ids)
    return compute_rloo_outcome_advantage(token_level_rewards, response_mask, group_ids)


@register_adv_estimator("reinforce_plus_plus")
def _reinforce_pp_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None,
                            group_ids=None, dp_group=None):
    return compute_reinforce_plus_plus_advantage(token_level_rewards, response_mask, config.gamma, dp_group)


@register_adv_estimator("reinforce_plus_plus_baseline")
def _reinforce_pp_baseline_estimator(token_level_rewards, response_mask, config: AdvantageConfig, *, values=None,
                                     group_ids=None, dp_group=None):
    _needs_groups("reinforce_plus_plus_baseline", group_ids)
    return compute_reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, group_ids, dp_group)


# --------------------------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------------------------


def count_tokens_and_sequences(response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(num_tokens, num_seqs)`` of a (micro-)batch as 0-d float tensors: valid tokens, and rows with at least
    one valid token. Sum them over micro-batches (and data-parallel ranks) to get ``aggregate_loss``'s
    normalisers."""
    mask = response_mask.to(torch.float32)
    return mask.sum(), (mask.sum(-1) > 0).to(torch.float32).sum()


def _as_count(count: Tensor | float, like: Tensor) -> Tensor:
    """A normaliser as a tensor on ``like``'s device and dtype, at least 1 (an empty batch gives loss 0, not NaN)."""
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


def aggregate_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Modes:
      - ``token-mean``: ``sum_{b,t} L m / num_tokens`` (every token weighs the same; verl / DAPO default).
      - ``seq-mean-token-sum``: ``sum_b (sum_t L m) / num_seqs``.
      - ``seq-mean-token-mean``: ``sum_b (sum_t L m / n_b) / num_seqs`` with ``n_b`` the row's valid tokens
        (every sequence weighs the same; the original GRPO).
      - ``seq-mean-token-sum-norm``: ``sum_b (sum_t L m / T) / num_seqs`` with ``T`` the response budget
        (``loss_mat.shape[-1]``): Dr. GRPO's length-unbiased form (a token weighs the same in a short or a long
        response, and the scale does not depend on the batch's lengths).

    Args:
        loss_mat: ``(batch, seq)`` per-token loss.
        response_mask: ``(batch, seq)``.
        mode: one of ``LOSS_AGG_MODES``.
        num_tokens, num_seqs: the counts of the whole mini-batch this micro-batch belongs to (see the module
            docstring); default: this batch's own counts. With the whole mini-batch's counts the micro-batch
            losses sum exactly to the mini-batch's loss.
    """
    _check_shapes(loss_mat=loss_mat, response_mask=response_mask)
    mask = response_mask.to(loss_mat.dtype)
    local_tokens, local_seqs = count_tokens_and_sequences(response_mask)
    if mode == "token-mean":
        denominator = local_tokens if num_tokens is None else num_tokens
        return masked_sum(loss_mat, mask) / _as_count(denominator, loss_mat)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation '{mode}' (valid: {', '.join(LOSS_AGG_MODES)})")
    per_seq = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / loss_mat.shape[-1]
    denominator = local_seqs if num_seqs is None else num_seqs
    return per_seq.sum() / _as_count(denominator, loss_mat)


# --------------------------------------------------------------------------------------------------------------
# PPO losses and entropy
# --------------------------------------------------------------------------------------------------------------


def compute_policy_loss(
    old_logprob: Tensor,
    logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, with the optional dual clip for negative advantages (Ye et al. 2020).

    ``L_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))`` with ``r_t = exp(logprob - old_logprob)``;
    with ``clip_ratio_c`` (> 1), for ``A < 0`` the loss is further capped at ``-A * clip_ratio_c`` so a token
    whose ratio exploded cannot dominate.

    Args:
        old_logprob, logprob, advantages, response_mask: ``(batch, seq)``; ``logprob`` carries the gradient.
        clip_ratio: epsilon for both sides unless ``clip_ratio_low`` / ``clip_ratio_high`` are given (DAPO's
            asymmetric clip).
        clip_ratio_c: the dual-clip bound; None disables it.
        loss_agg_mode, num_tokens, num_seqs: see ``aggregate_loss``.

    Returns:
        ``(loss, metrics)``; metrics ``actor/pg_loss``, ``actor/pg_clipfrac`` (tokens where the clip is active),
        ``actor/pg_clipfrac_lower`` (tokens where the dual clip is active), ``actor/ppo_kl`` (mean of
        ``old_logprob - logprob``, the approximate KL to the rollout policy); fractions over this batch's tokens.
    """
    _check_shapes(old_logprob=old_logprob, logprob=logprob, advantages=advantages, response_mask=response_mask)
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"the dual-clip bound clip_ratio_c must be > 1, got {clip_ratio_c}")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_ratio = (logprob - old_logprob).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - low, 1 + high)
    losses = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).to(logprob.dtype), response_mask)
    clipfrac_lower = torch.zeros((), dtype=logprob.dtype, device=logprob.device)
    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c
        capped = torch.minimum(losses, cap)
        clipfrac_lower = masked_mean(((losses > cap) & (advantages < 0)).to(logprob.dtype), response_mask)
        losses = torch.where(advantages < 0, capped, losses)
    loss = aggregate_loss(losses, response_mask, loss_agg_mode, num_tokens, num_seqs)
    metrics = {
        "actor/pg_loss": _metric(loss),
        "actor/pg_clipfrac": _metric(clipfrac),
        "actor/pg_clipfrac_lower": _metric(clipfrac_lower),
        "actor/ppo_kl": _metric(masked_mean(-log_ratio, response_mask)),
    }
    return loss, metrics


def compute_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.

    Args:
        values: ``(batch, seq)`` current critic values (with gradient).
        old_values: ``(batch, seq)`` values at rollout time.
        returns: ``(batch, seq)`` targets (GAE returns).
        response_mask: ``(batch, seq)``.
        clip_range: ``c``; None for the unclipped squared error.
        loss_agg_mode, num_tokens, num_seqs: see ``aggregate_loss``.

    Returns:
        ``(loss, metrics)``; metrics ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``.
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        losses, clipfrac = unclipped, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        losses = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), response_mask)
    loss = 0.5 * aggregate_loss(losses, response_mask, loss_agg_mode, num_tokens, num_seqs)
    metrics = {
        "critic/vf_loss": _metric(loss),
        "critic/vf_clipfrac": _metric(clipfrac),
        "critic/vpred_mean": _metric(masked_mean(values, response_mask)),
    }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor, group=None) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the valid tokens (of every rank of ``group`` when given): 1 is a perfect
    critic, <= 0 no better than a constant."""
    residual_var = masked_var(returns - values, response_mask, group=group)
    return 1 - residual_var / masked_var(returns, response_mask, group=group).clamp(min=1e-8)


def compute_kl_loss(
    logprob: Tensor,
    ref_logprob: Tensor,
    response_mask: Tensor,
    estimator: str = "k3",
    kl_clamp: float | None = 10.0,
    loss_agg_mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference as a loss term (GRPO): ``aggregate(kl_penalty(logprob, ref_logprob))``.

    Returns ``(loss, metrics)`` with ``actor/kl_loss``; multiply by the KL coefficient in the caller.
    """
    kl = kl_penalty(logprob, ref_logprob, estimator, kl_clamp)
    loss = aggregate_loss(kl, response_mask, loss_agg_mode, num_tokens, num_seqs)
    return loss, {"actor/kl_loss": _metric(loss)}


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``(batch, seq)`` log-probability of ``labels`` under ``logits (batch, seq, vocab)``, full vocabulary on one
    rank (the tensor-parallel version is ``rlhf.logprobs.vocab_parallel_logprobs``)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``(batch, seq)`` entropy ``logsumexp(z) - sum softmax(z) z`` of ``logits (batch, seq, vocab)``."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def compute_entropy_loss(
    entropy: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy's mean entropy (``(batch, seq)`` in); subtract ``coef * loss`` from the actor loss as a bonus."""
    loss = aggregate_loss(entropy, response_mask, loss_agg_mode, num_tokens, num_seqs)
    return loss, {"actor/entropy": _metric(loss)}


# --------------------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019)'s proportional controller steering the measured KL towards ``target_kl``.

    ``value *= 1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps / horizon``: the error is clipped so one
    noisy batch moves the coefficient by at most 20% of ``n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        super().__init__(init_kl_coef)
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
        self.target, self.horizon = float(target_kl), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_kl_controller(kind: str, kl_coef: float, target_kl: float | None = None,
                        horizon: int | None = None) -> FixedKLController:
    """``fixed`` or ``adaptive`` (needs ``target_kl`` and ``horizon``)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target_kl is None or horizon is None:
            raise ValueError("the adaptive KL controller needs target_kl and horizon")
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller '{kind}' (valid: adaptive, fixed)")


# --------------------------------------------------------------------------------------------------------------
# Preference losses: reward model, DPO
# --------------------------------------------------------------------------------------------------------------




def compute_pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    num_pairs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reward model's Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected - margin)``, averaged over pairs.

    Args:
        chosen_rewards, rejected_rewards: ``(batch,)`` scalar rewards of each pair's two responses.
        margin: ``(batch,)`` or a float, the required gap (Llama 2); None for 0.
        num_pairs: pairs in the whole mini-batch (micro-batch losses then sum to its loss); default ``batch``.

    Returns:
        ``(loss, metrics)``; metrics ``rm/loss``, ``rm/accuracy`` (chosen strictly above rejected),
        ``rm/margin`` (mean ``r_chosen - r_rejected``), ``rm/chosen``, ``rm/rejected`` (means), over this batch.
    """
    _check_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.dim() != 1:
        raise ValueError(f"rewards must be (batch,), got {tuple(chosen_rewards.shape)}")
    gap = chosen_rewards - rejected_rewards
    shifted = gap if margin is None else gap - margin
    loss = -F.logsigmoid(shifted).sum() / _as_count(gap.shape[0] if num_pairs is None else num_pairs, gap)
    metrics = {
        "rm/loss": _metric(loss),
        "rm/accuracy": _metric((gap > 0).to(gap.dtype).mean()),
        "rm/margin": _metric(gap.mean()),
        "rm/chosen": _metric(chosen_rewards.mean()),
        "rm/rejected": _metric(rejected_rewards.mean()),
    }
    return loss, metrics


def compute_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    num_pairs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO's sigmoid loss (Rafailov et al. 2023) on sequence log-probs (sum over response tokens).

    ``h = (pi_c - pi_r) - (ref_c - ref_r)``; ``loss = -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)``
    (``ls`` > 0 is cDPO's label smoothing for noisy preferences). The implicit rewards are
    ``beta (pi - ref)`` of each response.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` summed log-probs under the policy (with grad).
        reference_chosen_logps, reference_rejected_logps: ``(batch,)`` the same under the frozen reference,
            computed once per batch.
        beta: > 0; larger keeps the policy closer to the reference.
        label_smoothing: in [0, 0.5).
        num_pairs: pairs in the whole mini-batch; default ``batch``.

    Returns:
        ``(loss, metrics)``; metrics ``dpo/loss``, ``dpo/rewards_chosen``, ``dpo/rewards_rejected``,
        ``dpo/reward_accuracy`` (chosen implicit reward strictly higher), ``dpo/reward_margin``,
        ``dpo/logps_chosen``, ``dpo/logps_rejected`` (batch means).
    """
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_log_ratio - rejected_log_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    loss = losses.sum() / _as_count(losses.shape[0] if num_pairs is None else num_pairs, losses)
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    metrics = {
        "dpo/loss": _metric(loss),
        "dpo/rewards_chosen": chosen_rewards.mean(),
        "dpo/rewards_rejected": rejected_rewards.mean(),
        "dpo/reward_accuracy": (chosen_rewards > rejected_rewards).to(losses.dtype).mean(),
        "dpo/reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "dpo/logps_chosen": _metric(policy_chosen_logps.mean()),
        "dpo/logps_rejected": _metric(policy_rejected_logps.mean()),
    }
    return loss, metrics
