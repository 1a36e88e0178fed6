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
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
LORA_KEY = ".lora."  # in every adapter parameter's (and checkpoint key's) name


@dataclass(frozen=True)
class LoRAConfig:
    """``--lora-rank`` r, ``--lora-alpha`` (scale alpha / r), ``--lora-dropout`` (on the adapter's input) and
    ``--lora-target-modules`` (a subset of TARGET_MODULES)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 (got {self.rank})")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be a positive number (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ConfigError(f"--lora-target-modules: unknown {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(TARGET_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"--lora-target-modules lists a module twice: {' '.join(self.target_modules)}")
        return self

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse a rank larger than a targeted layer: ``shapes`` maps each target to its full (out, in)."""
        for name in self.target_modules:
            out_features, in_features = shapes[name]
            if self.rank > min(out_features, in_features):
                raise ConfigError(f"--lora-rank {self.rank} is larger than {name} ({out_features} x {in_features}): "
                                  f"use at most {min(out_features, in_features)}")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        return cls(int(data["rank"]), float(data["alpha"]), float(data.get("dropout", 0.0)),
                   tuple(data["target_modules"])).validate()


def layer_shapes(arch) -> dict[str, tuple[int, int]]:
    """Full (out, in) of each target linear of a decoder layer of ``arch`` (a ModelArch)."""
    q = arch.num_attention_heads * arch.head_dim
    kv = 2 * arch.num_query_groups * arch.head_dim
    fc1 = arch.ffn_hidden_size * (2 if arch.gated_linear_unit else 1)
    return {"linear_qkv": (q + kv, arch.hidden_size), "linear_proj": (arch.hidden_size, q),
            "linear_fc1": (fc1, arch.hidden_size), "linear_fc2": (arch.hidden_size, arch.ffn_hidden_size)}


def full_adapter_init(name: str, rank: int, in_features: int, out_features: int, seed: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the full layer: A as PEFT initialises it (kaiming-uniform, a = sqrt(5)), B zero; A depends only
    on (seed, ``name``), the parameter's global name."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight
    weight_a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return weight_a.to(dtype), torch.zeros(out_features, rank, dtype=dtype)


class LoRAAdapter(torch.nn.Module):
    """The low-rank path of one tensor-parallel linear (its local shards; see the module docstring)."""

    def __init__(self, weight_a: torch.Tensor, weight_b: torch.Tensor, scale: float, dropout: float,
                 column_parallel: bool, gated_rows: bool = False):
        """``gated_rows``: B's local rows are this rank's [gate_r; up_r] (a SwiGLU fc1), stored as megatron-core
        stores fc1's weight (global [gate; up]) so a checkpoint reshards across TP sizes."""
        super().__init__()
        self.gated_rows = gated_rows
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.weight_a = torch.nn.Parameter(weight_a)
        self.weight_b = torch.nn.Parameter(weight_b)
        self.scale, self.dropout, self.column_parallel = scale, dropout, column_parallel
        self.enabled = True
        sharded, dim = (self.weight_b, 0) if column_parallel else (self.weight_a, 1)
        set_tensor_model_parallel_attributes(sharded, True, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            get_cuda_rng_tracker,
            reduce_from_tensor_model_parallel_region,
        )

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
        from megatron.core import parallel_state
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

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
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

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


# --- the adapter checkpoint's pointer to its base ------------------------------------------------------------------

LORA_META = "lora.json"  # in an adapter checkpoint's iteration directory: the LoRA settings and the frozen base


def write_lora_meta(iter_dir, lora: LoRAConfig, base_dir) -> None:
    """Record in ``iter_dir`` that it holds only adapters, trained with ``lora`` on the base at ``base_dir``."""
    path = Path(iter_dir) / LORA_META
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"lora": lora.to_dict(), "base": str(Path(base_dir).resolve())}, indent=2) + "\n")
    tmp.replace(path)


def read_lora_meta(iter_dir) -> dict | None:
    """{"lora": LoRAConfig, "base": Path} of an adapter checkpoint, or None for a checkpoint of full weights."""
    path = Path(iter_dir) / LORA_META
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {"lora": LoRAConfig.from_dict(data["lora"]), "base": Path(data["base"])}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a LoRA record: {error}") from None
