"""ALiBi slopes: equal to HF transformers' (bloom) and to Baichuan-13B's published formula; split per TP rank."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.layers.alibi import alibi_bias, alibi_core_attention, alibi_slopes, local_alibi_slopes
from tests.reference.baichuan import interleave_slopes


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 32, 40, 64, 71, 112])
def test_slopes_equal_transformers_bloom(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


@pytest.mark.parametrize("heads", [3, 6, 12, 40, 64])
def test_slopes_match_baichuan_formula(heads):
    # Baichuan computes in float64 Python floats, HF bloom in float32 powers: equal to float32 rounding.
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(interleave_slopes(heads)), rtol=1e-6, atol=0)


def test_non_power_of_two_takes_interleaved_slopes():
    # 6 heads: the 4 of the power-of-two series 2^-2, 2^-4, 2^-6, 2^-8, then odd powers of 2^-1: 2^-1, 2^-3.
    expected = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert torch.equal(alibi_slopes(6), expected)


@pytest.mark.parametrize("heads,tp", [(6, 2), (6, 3), (40, 4), (12, 1)])
def test_each_tp_rank_gets_its_own_heads(heads, tp):
    shards = [local_alibi_slopes(heads, tp, rank) for rank in range(tp)]
    assert all(len(s) == heads // tp for s in shards)
    assert torch.equal(torch.cat(shards), alibi_slopes(heads))


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="does not divide the 6 attention heads"):
        local_alibi_slopes(6, 4, 0)


def test_bias_is_slope_times_key_position():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 4, torch.float32)
    assert bias.shape == (1, 2, 1, 4)
    assert torch.equal(bias[0, :, 0], torch.tensor([[0, 0.5, 1.0, 1.5], [0, 0.25, 0.5, 0.75]]))


def test_transformer_engine_alibi_refused_without_te():
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if HAVE_TE:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        alibi_core_attention("transformer_engine")
