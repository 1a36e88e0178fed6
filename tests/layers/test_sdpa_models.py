"""Whole models on the fast local path (SDPA attention, SwiGLU MLP) equal the same models built from megatron-core's
own unfused local modules, at TP=2: llama (GQA, RoPE, SwiGLU) and bloom (ALiBi, embedding norm, GeLU); logits
causal and with a packed-sequence mask, and every parameter's gradient of a training loss."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.runtime import run_on_local_ranks

TOLERANCE = 1e-4  # fp32 logits, as the parity tests
GRAD_TOLERANCE = 1e-5  # fp32 gradients of a mean token loss


def tp_worker(family: str, tp: int) -> dict:
    """Logits and gradients of one tiny random model of ``family`` at TP=tp, built on the fast path and on
    megatron-core's unfused modules from the same seed; TP rank 0 returns them (its shard of every gradient)."""
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
    for name, fused in (("fast", True), ("reference", False)):
        set_seed(0)  # the same weights for both
        model = build_model(arch, arch.vocab_size, config=config, parallel_output=False, fused_local=fused)
        model.eval()
        with torch.no_grad():
            out[name] = forward_logits(model, tokens)
            out[name + "_masked"] = model(tokens, positions, mask)
        model.train()
        model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).mean().backward()
        out[name + "_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_fast_path_at_tp2_equals_megatron_modules(family):
    out = run_on_local_ranks(tp_worker, 2, family, 2, timeout=300)[0]
    assert (out["fast"] - out["reference"]).abs().max() <= TOLERANCE
    assert (out["fast_masked"] - out["reference_masked"]).abs().max() <= TOLERANCE
    assert not torch.allclose(out["fast"][0], out["fast_masked"][0])  # the mask mattered
    assert out["fast_grads"].keys() == out["reference_grads"].keys()
    for name, grad in out["fast_grads"].items():
        assert (grad - out["reference_grads"][name]).abs().max() <= GRAD_TOLERANCE, name
