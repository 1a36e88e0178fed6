"""SwiGLU MLP for megatron-core's local layer spec: one autograd function instead of chunk + silu + offset + mul.

megatron-core 0.16's unfused gated MLP computes ``silu(gate) * (up + glu_linear_offset)``: the ``+ 0.0`` copies the
whole ``up`` half every step, and autograd keeps four ffn-wide tensors per layer (fc1's output via ``gate``, silu's
output, the offset copy; plus a concatenation of the two half-gradients in backward). ``swiglu`` saves only fc1's
output (two ffn-wide halves), recomputes ``silu(gate)`` in backward and writes both half-gradients straight into one
buffer. The values and gradients are the ones autograd computes for the unfused expression (same ops, same order).

Measured: the MLP keeps 3 instead of 5 ffn-wide activations per token (fc2's input included), 180 MB less per layer
at the llama-7B layer shape in bf16 (seq 4096); outputs and gradients are bit-identical; CPU time per MLP forward +
backward unchanged within noise (tests/layers/test_swiglu.py checks the bytes).

``SwiGLUMLP`` enters through the layer spec (``mlp``) and falls back to megatron-core's forward for
anything it does not cover (per-token scales, clamping, a GLU offset, megatron's own fused activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``y = [gate | up]`` (last dimension), saving only ``y``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)
        ctx.save_for_backward(y)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        gate, up = y.chunk(2, dim=-1)
        grad_y = torch.empty_like(y)
        grad_gate, grad_up = grad_y.chunk(2, dim=-1)  # views: both halves are written in place, no concatenation
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_y


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """[..., 2 * f] -> [..., f]: ``silu(y[..., :f]) * y[..., f:]`` (megatron-core's per-rank [gate; up] layout)."""
    return _SwiGLU.apply(y)


class SwiGLUMLP(MLP):
    """megatron-core ``MLP`` whose gated activation is ``swiglu``; same parameters, checkpoint and results.

    The layer spec names this class itself (``submodules.mlp = SwiGLUMLP``), not a ModuleSpec of it: for a
    ModuleSpec'd MLP other than its own, megatron-core's TransformerLayer logs "Unknown MLP type" on every layer.
    Built from the config alone, it uses the local spec's linears and the model-parallel TP group, as MLP does.
    """

    def __init__(self, config, submodules: MLPSubmodules | None = None, **kwargs):
        submodules = submodules or MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        super().__init__(config, submodules, **kwargs)
        self.uses_swiglu = (config.gated_linear_unit and config.activation_func is F.silu
                            and not config.bias_activation_fusion and not config.use_te_activation_func
                            and config.glu_linear_offset == 0.0 and config.activation_func_clamp_value is None)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.uses_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))  # (output [s, b, h], bias or None)
