"""Sampling primitives: filters, repetition penalty (against transformers' processor), argument rules, seeding."""

import pytest
import torch

from megatron_patch.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    select_next,
)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = filter_top_k(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert filter_top_p(logits, 0.6).isfinite().tolist() == [[True, False, True, False]]
    assert filter_top_p(logits, 0.96).isfinite().tolist() == [[True, True, True, True]]
    # The most likely token survives even a tiny p.
    assert filter_top_p(logits, 1e-6).isfinite().tolist() == [[True, False, False, False]]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seen = torch.randint(0, 50, (3, 12))  # repeats included
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), expected)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(top_k=5, top_p=0.9), "--top-k 5 and --top-p 0.9"),
    (dict(top_k=-1), "--top-k"),
    (dict(top_p=1.5, top_k=0), "--top-p"),
    (dict(temperature=0.0), "--temperature"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
])
def test_invalid_sampling_arguments_are_refused(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        SamplingParams(**kwargs)


def test_greedy_is_top_k_one_and_ignores_the_generator():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert select_next(logits, SamplingParams(top_k=1), torch.empty(2, 0, dtype=torch.long), None).tolist() == [1, 0]


@pytest.mark.parametrize("params", [SamplingParams(top_k=0, temperature=0.7), SamplingParams(top_k=4),
                                    SamplingParams(top_k=0, top_p=0.8, temperature=1.3)])
def test_sampling_is_reproducible_with_a_seed_and_varies_without(params):
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    seen = torch.empty(4, 0, dtype=torch.long)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([select_next(logits, params, seen, generator) for _ in range(20)])

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_top_k_sampling_never_leaves_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    allowed = torch.topk(logits, 3).indices
    generator = torch.Generator().manual_seed(0)
    seen = torch.empty(2, 0, dtype=torch.long)
    for _ in range(50):
        picked = select_next(logits, SamplingParams(top_k=3), seen, generator)
        assert all(picked[i] in allowed[i] for i in range(2))
