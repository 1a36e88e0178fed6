"""The actor's and the critic's loss functions for megatron-core's pipeline schedule (last stage only).

Each receives one micro-batch of experience and the stage's output, and returns ``(loss, {"actor"|"critic":
report})``. Losses are aggregated with the normalisers of the whole mini-batch over every data-parallel rank
(``core_algos.aggregate_loss``): the micro-batch losses then *sum* to the mini-batch loss. megatron-core divides
each micro-batch loss by the number of micro-batches and DDP averages gradients over data-parallel ranks, so the
returned loss is multiplied by ``num_microbatches * dp`` to undo both (see ``core_algos``' module docstring).

Reports are sums (token-weighted where the metric is a per-token mean), so the sum over micro-batches and ranks
is exact; ``reduce_report`` divides at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from ..algos.core_algos import (
    compute_entropy_loss,
    compute_kl_loss,
    compute_policy_loss,
    compute_value_loss,
    masked_sum,
)
from ..algos.logprobs import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from ..schedule_utils import reduce_sums
from .experience import gather_response

ACTOR_REPORT = ("pg_loss", "entropy", "kl_loss", "ptx_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
CRITIC_REPORT = ("vf_loss", "vf_clipfrac")


@dataclass(frozen=True)
class LossSettings:
    """What every micro-batch of one mini-batch shares."""

    vocab_size: int
    response_length: int
    temperature: float
    clip_ratio: float
    value_clip: float | None
    entropy_coef: float
    kl_loss_coef: float  # 0 without a KL loss (PPO keeps its KL in the reward)
    ptx_coef: float
    loss_agg_mode: str
    num_tokens: torch.Tensor | None  # of the whole mini-batch, over all data-parallel ranks
    num_seqs: torch.Tensor | None
    num_microbatches: int
    dp: int
    clip_ratio_low: float | None = None  # asymmetric clip (default: clip_ratio)
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = None  # dual clip
    kl_loss_type: str = "k3"


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def response_logprobs(microbatch: dict, logits: torch.Tensor, settings, with_entropy: bool):
    """``(rows, R)`` log-probs (and entropy) of the sampled response tokens, from vocab-parallel logits scaled by
    the sampling temperature (the distribution the rollout sampled from)."""
    logprob, entropy = vocab_parallel_logprobs_and_entropy(logits / settings.temperature, microbatch["labels"],
                                                           _tp_group(), settings.vocab_size, with_entropy)
    starts, length = microbatch["starts"], settings.response_length
    return gather_response(logprob, starts, length), (None if entropy is None else
                                                      gather_response(entropy, starts, length))


def actor_loss(settings: LossSettings, microbatch: dict, output: torch.Tensor):
    rows = microbatch["response_mask"].shape[0]  # the rows after them (if any) are PTX rows
    mask = microbatch["response_mask"]
    logprob, entropy = response_logprobs(microbatch, output[:rows], settings, with_entropy=True)
    agg = dict(loss_agg_mode=settings.loss_agg_mode, num_tokens=settings.num_tokens, num_seqs=settings.num_seqs)
    pg_loss, metrics = compute_policy_loss(microbatch["old_logprob"], logprob, microbatch["advantages"], mask,
                                           settings.clip_ratio, settings.clip_ratio_low, settings.clip_ratio_high,
                                           settings.clip_ratio_c, **agg)
    entropy_loss, _ = compute_entropy_loss(entropy, mask, **agg)
    loss = pg_loss - settings.entropy_coef * entropy_loss
    kl_loss = torch.zeros_like(pg_loss)
    if settings.kl_loss_coef > 0:
        kl_loss, _ = compute_kl_loss(logprob, microbatch["ref_logprob"], mask, settings.kl_loss_type, **agg)
        loss = loss + settings.kl_loss_coef * kl_loss
    ptx_loss = torch.zeros_like(pg_loss)
    if settings.ptx_coef > 0:  # the LM loss of the pretraining rows: the mean over the mini-batch's micro-batches
        # and data-parallel ranks, so it too sums to the mini-batch's loss like the terms above.
        ptx_mask = microbatch["ptx_loss_mask"]
        ptx_logprob = vocab_parallel_logprobs(output[rows:], microbatch["ptx_labels"], _tp_group(),
                                              settings.vocab_size)
        share = settings.num_microbatches * settings.dp
        ptx_loss = -masked_sum(ptx_logprob, ptx_mask) / ptx_mask.sum().clamp(min=1) / share
        loss = loss + settings.ptx_coef * ptx_loss
    tokens = mask.sum()
    report = torch.stack([pg_loss.detach(), entropy_loss.detach(), kl_loss.detach(), ptx_loss.detach(),
                          metrics["actor/pg_clipfrac"] * tokens, metrics["actor/pg_clipfrac_lower"] * tokens,
                          metrics["actor/ppo_kl"] * tokens, tokens])
    return loss * (settings.num_microbatches * settings.dp), {"actor": report}


def critic_loss(settings: LossSettings, microbatch: dict, output: torch.Tensor):
    mask = microbatch["response_mask"]
    values = gather_response(output[..., 0].float(), microbatch["starts"], settings.response_length)
    loss, metrics = compute_value_loss(values, microbatch["values"], microbatch["returns"], mask, settings.value_clip,
                                       settings.loss_agg_mode, settings.num_tokens, settings.num_seqs)
    tokens = mask.sum()
    report = torch.stack([loss.detach(), metrics["critic/vf_clipfrac"] * tokens, tokens])
    return loss * (settings.num_microbatches * settings.dp), {"critic": report}


def reduce_report(reduced: list[dict], key: str, names: tuple[str, ...], token_weighted: set[str]) -> dict:
    """Sum the reports over micro-batches and data-parallel ranks (shared with every pipeline stage); divide the
    token-weighted entries by the token count. Per-mini-batch losses are already normalised: summed as they are."""
    sums = reduce_sums(reduced, key, len(names) + 1)
    tokens = float(sums[-1].clamp(min=1))
    return {name: float(value) / (tokens if name in token_weighted else 1.0) for name, value in zip(names, sums)}
