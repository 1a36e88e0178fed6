"""LoRA: low-rank adapters on megatron-core's tensor-parallel linears, the base weights frozen.

Each targeted linear computes ``y = W x + (alpha / rank) * B A dropout(x)`` with ``A`` (rank, in) and ``B`` (out,
rank); ``B`` starts at zero, so the adapted model starts as the base model. Targets are the decoder layers'
``linear_qkv``, ``linear_proj`` (attention) and ``linear_fc1``, ``linear_fc2`` (MLP).

Tensor parallelism (no communication beyond what the base layer already does, plus one on the rank-wide tensor):
  - column-parallel (qkv, fc1; the input is the full hidden state, the output is split by rows): ``A`` is
    replicated, ``B`` holds this rank's output rows. ``h = A x`` is computed on every rank and enters the TP region
    through megatron-core's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), so
    ``A``'s gradient is the sum over the ranks' ``B`` shards, equal on every rank.
  - row-parallel (proj, fc2; the input is split by columns, the output is reduced over TP): ``A`` holds this rank's
    input columns, ``B`` is replicated. ``h = sum over ranks of A_r x_r`` (``reduce_from_tensor_model_parallel_region``),
    then ``B h`` is the same on every rank and is added after the base layer's reduction.
Sharded adapter weights carry megatron-core's tensor-parallel attributes (gradient-norm and checkpoint sharding
see them as split); replicated ones do not (counted once, stored once).

The adapters are created on the full shape from a generator seeded by (seed, global parameter name) and then
split, so a TP2 or PP2 run starts from exactly the adapters of a TP1 run. Checkpoint keys:
``<linear>.lora.weight_a`` / ``<linear>.lora.weight_b`` next to the linear's own (unchanged) keys.

The LoRA forward runs on megatron-core's local spec linears; Transformer Engine's fused LayerNorm-linear (qkv, fc1)
applies its norm inside the module, where an adapter cannot see the normalised input, so the TE spec is refused.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..errors import ConfigError
from .lora_config import COLUMN_PARALLEL, LoRAConfig, full_adapter_init


class LoRAAdapter(torch.nn.Module):
    """The low-rank path of one tensor-parallel linear (its local shards; see the module docstring)."""

    def __init__(self, weight_a: torch.Tensor, weight_b: torch.Tensor, scale: float, dropout: float,
                 column_parallel: bool, gated_rows: bool = False):
        """``gated_rows``: B's local rows are this rank's [gate_r; up_r] (a SwiGLU fc1), stored as megatron-core
        stores fc1's weight (global [gate; up]) so a checkpoint reshards across TP sizes."""
        super().__init__()
        self.gated_rows = gated_rows
        self.weight_a = torch.nn.Parameter(weight_a)
        self.weight_b = torch.nn.Parameter(weight_b)
        self.scale, self.dropout, self.column_parallel = scale, dropout, column_parallel
        self.enabled = True
        sharded, dim = (self.weight_b, 0) if column_parallel else (self.weight_a, 1)
        set_tensor_model_parallel_attributes(sharded, True, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            if self.column_parallel:  # x is the same on every TP rank: so is its dropout mask (default generator)
                x = F.dropout(x, self.dropout, True)
            else:  # x is this rank's slice: a mask of its own
                with get_cuda_rng_tracker().fork():
                    x = F.dropout(x, self.dropout, True)
        h = F.linear(x, self.weight_a)
        h = copy_to_tensor_model_parallel_region(h) if self.column_parallel else reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.weight_b) * self.scale

    def delta(self) -> torch.Tensor:
        """scale x B A: the local shard of the weight change the adapter stands for."""
        return (self.weight_b.float() @ self.weight_a.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        axis = {"weight_b": 0} if self.column_parallel else {"weight_a": 1}
        dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True)
        state = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axis,
                                                    sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                    dp_cp_group=dp_cp_group)
        if self.gated_rows:
            key = f"{prefix}weight_b"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets)
        return state


class _LoRALinear:
    """Mixin over a megatron-core Column/RowParallelLinear: the base output plus the adapter's; the adapter's keys
    added beside the linear's own in ``sharded_state_dict``."""

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        adapter = self._modules.get("lora")
        if adapter is not None and adapter.enabled:
            output = output + adapter(input_).to(output.dtype)
        return output, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        with _hidden(self):
            state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter = self._modules.get("lora")
        if adapter is not None:
            state.update(adapter.sharded_state_dict(f"{prefix}lora.", sharded_offsets, metadata))
        return state


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _LORA_CLASSES:
        _LORA_CLASSES[base] = type(f"LoRA{base.__name__}", (_LoRALinear, base), {})
    return _LORA_CLASSES[base]


@contextlib.contextmanager
def _hidden(module: torch.nn.Module):
    adapter = module._modules.pop("lora", None)
    try:
        yield
    finally:
        if adapter is not None:
            module._modules["lora"] = adapter


def target_linears(model):
    """(global parameter prefix, target name, linear) of every targetable linear of this model stage; the prefix
    names the layer by its global number (the same at any PP size)."""
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        index = layer.layer_number - 1
        for attr, name in (("self_attention", "linear_qkv"), ("self_attention", "linear_proj"),
                           ("mlp", "linear_fc1"), ("mlp", "linear_fc2")):
            parent = getattr(layer, attr, None)
            linear = getattr(parent, name, None) if parent is not None else None
            if linear is not None:
                yield f"decoder.layers.{index}.{attr}.{name}", name, linear


def add_lora(model, lora: LoRAConfig, seed: int = 0) -> int:
    """Freeze every parameter of ``model`` (a GPTModel stage) and add adapters to the targeted linears; returns the
    number of adapter parameters on this rank. Call before wrapping in DDP and building the optimizer."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    for param in model.parameters():
        param.requires_grad_(False)
    count = 0
    for prefix, name, linear in target_linears(model):
        if name not in lora.target_modules:
            continue
        column = name in COLUMN_PARALLEL
        expected = ColumnParallelLinear if column else RowParallelLinear
        if not isinstance(linear, expected) or isinstance(linear, _LoRALinear):
            raise ConfigError(f"LoRA works on megatron-core's local-spec linears; {prefix} is "
                              f"{type(linear).__name__} (use --transformer-impl local)")
        out_local, in_local = linear.weight.shape
        out_full, in_full = (out_local * tp, in_local) if column else (out_local, in_local * tp)
        weight_a, weight_b = full_adapter_init(f"{prefix}.lora", lora.rank, in_full, out_full, seed,
                                               linear.weight.dtype)
        if column:
            weight_b = weight_b.chunk(tp, dim=0)[rank]
        else:
            weight_a = weight_a.chunk(tp, dim=1)[rank]
        device = linear.weight.device
        gated = name == "linear_fc1" and linear.config.gated_linear_unit
        adapter = LoRAAdapter(weight_a.contiguous().to(device), weight_b.contiguous().to(device), lora.scale,
                              lora.dropout, column, gated)
        linear.__class__ = _lora_class(type(linear))
        linear.add_module("lora", adapter)
        count += adapter.weight_a.numel() + adapter.weight_b.numel()
    return count


def lora_adapters(model):
    """(local parameter prefix, adapter) of every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            yield name, module


def has_lora(model) -> bool:
    return any(True for _ in lora_adapters(model))


@contextlib.contextmanager
def without_adapters(model):
    """``model`` as the plain base model (its state dicts and forward without the adapters) inside the block: to
    load base weights strictly, or to use the base as the frozen reference of preference / RL training."""
    linears = [m for m in model.modules() if isinstance(m, _LoRALinear)]
    with contextlib.ExitStack() as stack:
        for linear in linears:
            stack.enter_context(_hidden(linear))
        yield model


@contextlib.contextmanager
def adapters_disabled(model):
    """Forward through the base weights only (the adapters kept, their output skipped): the reference policy of
    DPO / GRPO with LoRA without a second model."""
    adapters = [adapter for _, adapter in lora_adapters(model)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter in adapters:
            adapter.enabled = True
