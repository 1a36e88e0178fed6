"""Whole models with SDPA attention equal the same models with megatron-core's unfused attention at TP=2 (llama with
GQA and RoPE, bloom with ALiBi and the embedding norm), causal and with a packed-sequence mask."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.runtime import run_on_local_ranks


def tp_logits_worker(family: str, tp: int) -> dict:
    """Logits of one tiny random model of ``family`` at TP=tp with SDPA and with the unfused attention (same init),
    for a causal batch and a packed-mask batch; TP rank 0 returns them."""
    from megatron_patch.models import get_family
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed, set_seed

    init_distributed(tp, 1, seed=0)
    fam = get_family(family)
    arch = fam.arch_from_hf(fam.flavor("tiny"))
    config = transformer_config(arch, tensor_model_parallel_size=tp)
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12).expand(2, -1)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().logical_not().expand(2, 1, 12, 12).clone()
    mask[0, 0, 6:, :6] = True  # two packed samples in row 0
    out = {}
    for name, unfused in (("sdpa", False), ("unfused", True)):
        set_seed(0)  # the same weights for both
        model = build_model(arch, arch.vocab_size, config=config, parallel_output=False,
                            unfused_attention=unfused).eval()
        with torch.no_grad():
            out[name] = forward_logits(model, tokens)
            out[name + "_masked"] = model(tokens, positions, mask)
    return out


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_models_at_tp2_equal_unfused(family):
    logits = run_on_local_ranks(tp_logits_worker, 2, family, 2, timeout=300)[0]
    assert (logits["sdpa"] - logits["unfused"]).abs().max() <= 1e-4
    assert (logits["sdpa_masked"] - logits["unfused_masked"]).abs().max() <= 1e-4
    assert not torch.allclose(logits["sdpa"][0], logits["sdpa_masked"][0])  # the mask mattered
