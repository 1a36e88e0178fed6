"""Vocab-parallel log-probs and entropy: TP=2 on gloo equals TP=1 (values and gradients), and the plain formulas."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.rlhf.algos.core_algos import entropy_from_logits, logprobs_from_logits
from megatron_patch.rlhf.algos.logprobs import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from megatron_patch.runtime import run_on_local_ranks
from tests.rlhf import workers


def _inputs(vocab: int, real_vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, vocab, generator=gen) * 30  # large logits exercise the max shift
    labels = torch.randint(0, real_vocab, (3, 5), generator=gen)
    weights = torch.randn(2, 3, 5, generator=gen)
    return logits, labels, weights


def _reference(logits, labels, weights, real_vocab):
    """TP=1 on the real vocabulary with the plain formulas; gradient with respect to the (padded) logits."""
    logits = logits.clone().requires_grad_()
    real = logits[..., :real_vocab]
    logprob, entropy = logprobs_from_logits(real, labels), entropy_from_logits(real)
    (weights[0] * logprob + weights[1] * entropy).sum().backward()
    return logprob.detach(), entropy.detach(), logits.grad


@pytest.mark.parametrize("vocab,real_vocab", [(12, 12), (12, 10)], ids=["no-padding", "padded-vocab"])
def test_single_rank_matches_the_plain_formulas(vocab, real_vocab):
    logits, labels, weights = _inputs(vocab, real_vocab)
    ref_logprob, ref_entropy, ref_grad = _reference(logits, labels, weights, real_vocab)
    leaf = logits.clone().requires_grad_()
    logprob, entropy = vocab_parallel_logprobs_and_entropy(leaf, labels, vocab_size=real_vocab)
    (weights[0] * logprob + weights[1] * entropy).sum().backward()
    torch.testing.assert_close(logprob, ref_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(leaf.grad, ref_grad, atol=1e-5, rtol=0)
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(vocab_parallel_logprobs(logits, labels, vocab_size=real_vocab), ref_logprob,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab,real_vocab", [(12, 12), (12, 10)], ids=["no-padding", "padded-vocab"])
def test_tp2_equals_tp1_values_and_gradients(vocab, real_vocab):
    logits, labels, weights = _inputs(vocab, real_vocab, seed=1)
    # Put some labels on each rank's shard so both the owning and the non-owning path are exercised.
    labels[0, :] = torch.tensor([0, 5, 6, real_vocab - 1, 3])
    ref_logprob, ref_entropy, ref_grad = _reference(logits, labels, weights, real_vocab)
    results = run_on_local_ranks(workers.vocab_parallel_worker, 2, logits.tolist(), labels.tolist(),
                                 weights.tolist(), real_vocab, timeout=180)
    for result in results:
        torch.testing.assert_close(torch.tensor(result["logprob"]), ref_logprob, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(result["entropy"]), ref_entropy, atol=1e-5, rtol=0)
    grad = torch.cat([torch.tensor(r["grad"]) for r in results], dim=-1)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
    if real_vocab < vocab:
        assert (grad[..., real_vocab:] == 0).all()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="disagree on the leading"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
