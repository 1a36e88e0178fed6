"""SDPA core attention against megatron-core's unfused local ``DotProductAttention`` (the reference): fp32 outputs
and gradients for causal, GQA, ALiBi, padding masks (incl. rows masked everywhere), KV-cache decode shapes, dropout.
Each test runs in its own local rank (``in_rank``); whole models at TP=2: ``test_sdpa_models.py``."""

from __future__ import annotations

import pytest
import torch

from tests.layers.in_rank import in_rank

TOLERANCE = 1e-5  # fp32, one attention layer: the two paths differ only in summation order


def make_config(heads=4, groups=4, head_dim=8, dropout=0.0, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=dropout,
                             use_cpu_initialization=True, masked_softmax_fusion=False, **overrides)


def make_pair(config, alibi=False, mask_type=None):
    """(reference, sdpa) core attentions of one layer, built the way megatron-core's SelfAttention builds them."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.layers.alibi import alibi_core_attention
    from megatron_patch.layers.sdpa import sdpa_core_attention

    reference_cls = alibi_core_attention("local") if alibi else DotProductAttention
    kwargs = dict(config=config, layer_number=1, attn_mask_type=mask_type or AttnMaskType.causal,
                  attention_type="self", cp_comm_type=None, softmax_scale=None, pg_collection=None)
    return reference_cls(**kwargs), sdpa_core_attention(alibi=alibi)(**kwargs)


def qkv(config, sq, sk=None, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sk = sk or sq
    d = config.kv_channels
    q = torch.randn(sq, batch, config.num_attention_heads, d, generator=gen)
    k = torch.randn(sk, batch, config.num_query_groups, d, generator=gen)
    v = torch.randn(sk, batch, config.num_query_groups, d, generator=gen)
    return [t.requires_grad_() for t in (q, k, v)]


def run_both(reference, sdpa, q, k, v, mask=None, **kwargs):
    """Outputs and input gradients of both modules for the same inputs (and the same upstream gradient)."""
    results = []
    for module in (reference, sdpa):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = module(*inputs, mask, **kwargs)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        results.append((out.detach(), [t.grad for t in inputs]))
    return results


def assert_same(results):
    (ref_out, ref_grads), (out, grads) = results
    assert out.shape == ref_out.shape
    assert (out - ref_out).abs().max() <= TOLERANCE
    for name, ref_grad, grad in zip("qkv", ref_grads, grads):
        assert (grad - ref_grad).abs().max() <= TOLERANCE, name


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("alibi", [False, True])
@in_rank
def test_causal_equals_unfused(groups, alibi):
    config = make_config(heads=4, groups=groups)
    assert_same(run_both(*make_pair(config, alibi=alibi), *qkv(config, 9)))


@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("alibi", [False, True])
@in_rank
def test_padding_mask_equals_unfused(groups, alibi):
    # A packed-sequence mask as data/sft.py builds it, batch-specific, with one query row masked everywhere.
    config = make_config(heads=4, groups=groups)
    s = 10
    segment = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [-1] * 3])
    allowed = torch.ones(s, s, dtype=torch.bool).tril() & (segment[:, :, None] == segment[:, None, :])
    mask = ~allowed.unsqueeze(1)  # [b, 1, s, s], True = masked out
    mask[1, 0, 8] = True
    assert mask[1, 0, 8].all()
    results = run_both(*make_pair(config, alibi=alibi), *qkv(config, s), mask=mask)
    assert_same(results)


@in_rank
def test_mask_with_padding_type():
    from megatron.core.transformer.enums import AttnMaskType

    config = make_config()
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.6
    pair = make_pair(config, mask_type=AttnMaskType.padding)
    assert_same(run_both(*pair, *qkv(config, 6), mask=mask))


@pytest.mark.parametrize("alibi", [False, True])
@in_rank
def test_kv_cache_decode_step_equals_unfused(alibi):
    # After the prompt megatron-core's Attention passes one query, every cached key and mask type no_mask.
    from megatron.core.transformer.enums import AttnMaskType

    config = make_config(heads=4, groups=2)
    pair = make_pair(config, alibi=alibi)
    assert_same(run_both(*pair, *qkv(config, 1, sk=7), attn_mask_type=AttnMaskType.no_mask))
    # The first (prompt) step keeps the causal type: a single-token prompt has nothing to mask.
    assert_same(run_both(*pair, *qkv(config, 1, sk=1)))


@in_rank
def test_query_key_layer_scaling_keeps_the_scale():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.layers.sdpa import SDPADotProductAttention

    config = make_config(apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16)
    kwargs = dict(config=config, attn_mask_type=AttnMaskType.causal, attention_type="self")
    plain = SDPADotProductAttention(config=make_config(), layer_number=3, attn_mask_type=AttnMaskType.causal,
                                    attention_type="self")
    assert SDPADotProductAttention(layer_number=3, **kwargs).sdpa_scale == pytest.approx(plain.sdpa_scale)


@in_rank
def test_dropout_in_training_only():
    config = make_config(dropout=0.5)
    reference, sdpa = make_pair(config)
    q, k, v = (t.detach() for t in qkv(config, 8))
    sdpa.eval()
    reference.eval()
    assert (sdpa(q, k, v, None) - reference(q, k, v, None)).abs().max() <= TOLERANCE
    sdpa.train()
    first, second = sdpa(q, k, v, None), sdpa(q, k, v, None)
    assert (first - reference(q, k, v, None)).abs().max() > 0.1  # dropout applied ...
    assert not torch.equal(first, second)  # ... with fresh randomness each call, from the model-parallel stream
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    default = torch.get_rng_state()
    third = sdpa(q, k, v, None)
    assert torch.equal(torch.get_rng_state(), default)  # the default stream is untouched
    tracker.set_states(states)
    assert torch.equal(sdpa(q, k, v, None), third)  # replayable from the tracker's state


@in_rank
def test_refuses_what_it_cannot_compute():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.layers.sdpa import SDPADotProductAttention

    with pytest.raises(ValueError, match="sliding-window"):
        SDPADotProductAttention(config=make_config(window_size=(4, 0)), layer_number=1,
                                attn_mask_type=AttnMaskType.causal, attention_type="self")
    config = make_config()
    sdpa = make_pair(config)[1]
    q, k, v = qkv(config, 4)
    with pytest.raises(ValueError, match="packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams())
    with pytest.raises(ValueError, match="causal attention needs as many queries"):
        sdpa(*qkv(config, 3, sk=5), None)


def test_local_spec_uses_sdpa_by_default():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_patch.layers.alibi import alibi_core_attention
    from megatron_patch.layers.sdpa import SDPAAlibiDotProductAttention, SDPADotProductAttention
    from megatron_patch.models import get_family
    from megatron_patch.models.builder import layer_spec

    def core(arch, **kwargs):
        return layer_spec(arch, "local", **kwargs).submodules.self_attention.submodules.core_attention

    llama = get_family("llama").arch_from_hf(get_family("llama").flavor("tiny"))
    bloom = get_family("bloom").arch_from_hf(get_family("bloom").flavor("tiny"))
    assert core(llama) is SDPADotProductAttention and core(bloom) is SDPAAlibiDotProductAttention
    assert core(llama, fused_local=False) is DotProductAttention
    assert core(bloom, fused_local=False) is alibi_core_attention("local")


@in_rank
def test_backward_keeps_value_not_the_fused_qkv():
    # q, k, v arrive as views of linear_qkv's one output; only what backward needs may stay alive.
    config = make_config(heads=4, groups=2)
    sdpa = make_pair(config)[1]
    s, b, d = 6, 2, config.kv_channels
    fused = torch.randn(s, b, 2, (2 + 2) * d, requires_grad=True)  # per group: 2 query heads, k, v
    query, key, value = torch.split(fused, [2 * d, d, d], dim=3)
    storages = set()

    def pack(tensor):
        storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sdpa(query.reshape(s, b, 4, d) * 1.0, key * 1.0, value, None)
    assert fused.untyped_storage().data_ptr() not in storages
    out.sum().backward()
    assert fused.grad is not None


@in_rank
def test_layers_share_one_causal_alibi_bias():
    # SDPA keeps its mask for backward: a (heads, s, s) bias per layer would grow with the depth of the model.
    config = make_config()
    first, second = make_pair(config, alibi=True)[1], make_pair(config, alibi=True)[1]
    q = torch.zeros(2, 4, 6, 8)
    assert first._alibi(6, 6, True, q) is second._alibi(6, 6, True, q)
    assert first._alibi(5, 5, True, q).shape == (1, 4, 5, 5)  # a new length replaces it
