"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

With tensor parallelism the output layer is column-parallel: TP rank ``r`` of ``T`` holds the logits of vocabulary
ids ``[r * V/T, (r + 1) * V/T)``. Gathering them would cost ``batch x seq x V`` per rank (150k-word vocabularies
at 4k tokens: gigabytes), so we follow megatron-core's vocab-parallel cross entropy instead:

  - ``m = max_v z_v``: local max, all-reduced with MAX (no gradient: ``logsumexp`` does not depend on the shift);
  - ``S = sum_v exp(z_v - m)``: local sums, all-reduced; ``log p(y) = z_y - m - log S``;
  - ``z_y``: only the rank owning ``y`` has it; the others contribute 0 to an all-reduced sum;
  - entropy ``H = m + log S - (sum_v exp(z_v - m) z_v) / S`` with the numerator all-reduced the same way.

Gradients come from composing autograd with one differentiable collective, ``_AllReduceSum`` (sum forward,
identity backward): every TP rank computes the same replicated result from the reduced sums, so the gradient of
a reduced sum with respect to a rank's own contribution is the gradient of the result, which every rank already
holds locally (megatron-core's ``reduce_from_tensor_model_parallel_region`` has the same backward). The shift
``m`` is detached; exactness does not suffer because both ``log p`` and ``H`` are invariant to it.

Everything here takes the group as an argument (None: the whole vocabulary is on this rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in forward; identity in backward (the result is used identically on every rank)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _reduce_sum(tensor: Tensor, group) -> Tensor:
    return tensor if group is None else _AllReduceSum.apply(tensor, group)


def _vocab_range(shard_size: int, group) -> tuple[int, int]:
    rank = 0 if group is None else dist.get_rank(group)
    return rank * shard_size, (rank + 1) * shard_size


def vocab_parallel_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    tp_group=None,
    vocab_size: int | None = None,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of ``labels`` and the entropy of the distribution, from this rank's vocabulary shard.

    Args:
        logits: ``(batch, seq, vocab // tp)`` this TP rank's shard of the logits (any leading shape works); cast
            to fp32 here. Divide by the sampling temperature beforehand if the rollout sampled with one.
        labels: ``(batch, seq)`` token ids in the full vocabulary.
        tp_group: the tensor-parallel group the vocabulary is split over; None when this rank has it all.
        vocab_size: real vocabulary size; ids at or above it (the padding rows megatron adds so the vocabulary
            divides by TP) get probability 0, as in generation, which never samples them. None keeps all.
        with_entropy: also compute the entropy (costs one more vocabulary-sized temporary).

    Returns:
        ``(logprob, entropy)``, each ``(batch, seq)`` fp32 and identical on every rank of ``tp_group``;
        ``entropy`` is None without ``with_entropy``. Both carry gradients to ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on the leading "
                         f"(batch, seq) shape")
    logits = logits.float()
    shard = logits.shape[-1]
    start, end = _vocab_range(shard, tp_group)
    padding = None
    if vocab_size is not None and vocab_size < end:
        padding = torch.arange(start, end, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))

    shift = logits.detach().max(dim=-1, keepdim=True).values
    if tp_group is not None:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - shift
    exp = shifted.exp()
    sum_exp = _reduce_sum(exp.sum(-1), tp_group)
    log_sum_exp = sum_exp.log()

    owned = (labels >= start) & (labels < end)
    local_index = torch.where(owned, labels - start, torch.zeros_like(labels))
    target = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1)
    target = _reduce_sum(torch.where(owned, target, torch.zeros_like(target)), tp_group)
    logprob = target - log_sum_exp

    entropy = None
    if with_entropy:
        # H = log S - sum_v p_v (z_v - m). Padding ids have p = 0 but z = -inf: use 0 there, before the product,
        # or 0 * -inf would poison the value and the gradient with NaN.
        finite = shifted if padding is None else shifted.masked_fill(padding, 0.0)
        weighted = (exp * finite).sum(-1)
        entropy = log_sum_exp - _reduce_sum(weighted, tp_group) / sum_exp
    return logprob, entropy


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, tp_group=None, vocab_size: int | None = None) -> Tensor:
    """``(batch, seq)`` log-probability of ``labels``; see ``vocab_parallel_logprobs_and_entropy``."""
    return vocab_parallel_logprobs_and_entropy(logits, labels, tp_group, vocab_size, with_entropy=False)[0]
