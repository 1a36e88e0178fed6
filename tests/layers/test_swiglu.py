"""SwiGLUMLP against megatron-core's unfused gated MLP: the same outputs and gradients (bit for bit: the same ops in
the same order), fewer activations kept for backward, and megatron-core's forward where it is not a plain SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.layers.in_rank import in_rank


def make_pair(bias=False, **overrides):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch.layers.swiglu import SwiGLUMLP

    config = TransformerConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                               gated_linear_unit=True, activation_func=F.silu, add_bias_linear=bias,
                               use_cpu_initialization=True, **overrides)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    reference, fast = MLP(config, submodules, ffn_hidden_size=48), SwiGLUMLP(config, submodules, ffn_hidden_size=48)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_()  # biases too (megatron-core zero-initialises them)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def forward_backward(module, x, grad):
    x = x.detach().clone().requires_grad_()
    out, out_bias = module(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return out.detach(), out_bias, grads


def saved_activation_bytes(module, x) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters and the input excluded (storages counted once)."""
    storages = {}
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(size for ptr, size in storages.items() if ptr not in skip)


@pytest.mark.parametrize("bias", [False, True])
@in_rank
def test_same_outputs_and_gradients(bias):
    reference, fast = make_pair(bias=bias)
    assert fast.uses_swiglu
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(5, 3, 32, generator=gen), torch.randn(5, 3, 32, generator=gen)
    ref_out, ref_bias, ref_grads = forward_backward(reference, x, grad)
    out, out_bias, grads = forward_backward(fast, x, grad)
    assert torch.equal(out, ref_out)
    assert (out_bias is None) == (ref_bias is None) and (out_bias is None or torch.equal(out_bias, ref_bias))
    assert len(grads) == len(ref_grads) == (5 if bias else 3)  # x, fc1 weight [, bias], fc2 weight [, bias]
    for g, ref in zip(grads, ref_grads):
        # fc2's bias is returned for the caller to add (skip_bias_add): no gradient here on either side
        assert (g is None and ref is None) or torch.equal(g, ref)
    assert all(g is not None for g in grads[:3])


@in_rank
def test_keeps_fewer_activations():
    # megatron-core keeps fc1's output [s, b, 2f], silu's output and the `up + 0.0` copy (f each), and fc2's input
    # (f): 5f per token; SwiGLUMLP keeps fc1's output and fc2's input: 3f.
    reference, fast = make_pair()
    x = torch.randn(16, 2, 32, requires_grad=True)
    per_f = 16 * 2 * 48 * 4  # bytes of one [s, b, f] fp32 tensor
    assert saved_activation_bytes(reference, x) == 5 * per_f
    assert saved_activation_bytes(fast, x) == 3 * per_f


@in_rank
def test_megatron_forward_where_not_plain_swiglu():
    reference, fast = make_pair(glu_linear_offset=1.0)
    assert not fast.uses_swiglu
    x, grad = torch.randn(4, 2, 32), torch.randn(4, 2, 32)
    assert torch.equal(forward_backward(fast, x, grad)[0], forward_backward(reference, x, grad)[0])


def test_local_spec_uses_swiglu_mlp_for_gated_families():
    from megatron.core.transformer.mlp import MLP

    from megatron_patch.layers.swiglu import SwiGLUMLP
    from megatron_patch.models import get_family
    from megatron_patch.models.builder import layer_spec

    llama = get_family("llama").arch_from_hf(get_family("llama").flavor("tiny"))
    bloom = get_family("bloom").arch_from_hf(get_family("bloom").flavor("tiny"))
    assert layer_spec(llama).submodules.mlp is SwiGLUMLP
    assert layer_spec(llama, fused_local=False).submodules.mlp.module is MLP
    assert layer_spec(bloom).submodules.mlp.module is MLP  # GeLU: megatron-core's MLP is already one op
