"""Declarative weight-mapping rows: one megatron-core parameter <- one or more HF tensors.

A row names the megatron parameter (local-spec name, ``*`` for the layer index), the HF tensor(s) it is made
from (``*`` for the same global layer index), how the full tensor is split across TP ranks (a ``Split``), and a pair
of pure transforms on full tensors: ``hf_to_megatron`` and its exact inverse ``megatron_to_hf``. Sharding, PP
placement and vocabulary padding are not a row's business: ``sharding.py`` does them once for every family.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import UnsupportedModelError
from . import layouts


class Split(enum.Enum):
    """How a full megatron tensor is split across tensor-parallel ranks (the table is ``sharding.SPLITS``)."""

    COLUMN = "column"  # dim 0 (linear_qkv, linear_fc1 without GLU)
    ROW = "row"  # dim 1 (linear_proj, linear_fc2)
    REPLICATED = "replicated"  # norms, row-parallel biases
    VOCAB = "vocab"  # dim 0, after padding the vocabulary (word embeddings, output layer)
    GATED = "gated"  # SwiGLU fc1: each rank holds [gate_r; up_r]


class AttentionShape(Protocol):
    """What the q/k/v rows read of the architecture (``models.ModelArch`` has it; so does a TP rank's share)."""

    num_attention_heads: int
    num_query_groups: int


class Row(ABC):
    """One megatron parameter and the HF tensors it is made of; what the sharding engine calls.

    Attributes every row has: ``megatron`` (local-spec name, ``*`` for the layer) and ``split`` (a ``Split``).
    """

    megatron: str
    split: Split

    @property
    @abstractmethod
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensor names (``*`` for the global layer id), in the order the transforms take them."""

    @property
    def shards_inputs(self) -> bool:
        """True when a TP rank's shard is the transform of its own part of each HF input (split along the row's
        dim), so a rank reads only its part of the memory-mapped inputs (see ``Sharding.rank_shard``)."""
        return False

    @abstractmethod
    def hf_to_megatron(self, tensors: list[torch.Tensor], arch: AttentionShape) -> torch.Tensor:
        """Full HF tensors (in ``hf_names`` order) -> the full megatron tensor."""

    @abstractmethod
    def megatron_to_hf(self, tensor: torch.Tensor, arch: AttentionShape) -> list[torch.Tensor]:
        """Exact inverse of ``hf_to_megatron``."""

    @property
    def is_layer_row(self) -> bool:
        return "*" in self.megatron


@dataclass(frozen=True)
class Direct(Row):
    """A tensor that is the same in both layouts (up to TP sharding)."""

    megatron: str
    hf: str
    split: Split = Split.REPLICATED

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def shards_inputs(self) -> bool:
        return self.split in (Split.COLUMN, Split.ROW)

    def hf_to_megatron(self, tensors, arch):
        return tensors[0]

    def megatron_to_hf(self, tensor, arch):
        return [tensor]


@dataclass(frozen=True)
class QKV(Row):
    """Separate HF q/k/v projections (weight or bias) <-> megatron-core's per-group fused ``linear_qkv``."""

    megatron: str
    q: str
    k: str
    v: str
    split: Split = Split.COLUMN

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    @property
    def shards_inputs(self) -> bool:
        return True  # a rank holds whole query groups: its q, k and v rows are contiguous in HF's layout

    def hf_to_megatron(self, tensors, arch):
        return layouts.interleave_qkv(*tensors, arch.num_query_groups)

    def megatron_to_hf(self, tensor, arch):
        return list(layouts.split_qkv(tensor, arch.num_attention_heads, arch.num_query_groups))


@dataclass(frozen=True)
class GatedMLP(Row):
    """Separate HF gate and up projections <-> megatron-core's fused SwiGLU ``linear_fc1`` = [gate; up]."""

    megatron: str
    gate: str
    up: str
    split: Split = Split.GATED

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    @property
    def shards_inputs(self) -> bool:
        return True  # rank r holds [gate_r; up_r]

    def hf_to_megatron(self, tensors, arch):
        return layouts.concat(tensors, dim=0)

    def megatron_to_hf(self, tensor, arch):
        return list(torch.chunk(tensor, 2, dim=0))


@dataclass(frozen=True)
class FusedQKV(Row):
    """One HF tensor holding [q; k; v] as three consecutive blocks (Baichuan ``W_pack``, Qwen v1 ``c_attn``)
    <-> megatron-core's per-group ``linear_qkv`` (weight or bias)."""

    megatron: str
    hf: str
    split: Split = Split.COLUMN

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def hf_to_megatron(self, tensors, arch):
        return layouts.qkv_blocks_to_megatron(tensors[0], arch.num_attention_heads, arch.num_query_groups)

    def megatron_to_hf(self, tensor, arch):
        return [layouts.megatron_to_qkv_blocks(tensor, arch.num_attention_heads, arch.num_query_groups)]


@dataclass(frozen=True)
class PerHeadQKV(Row):
    """One HF tensor holding (q_h, k_h, v_h) per head (bloom ``query_key_value``) <-> megatron-core's
    ``linear_qkv``; multi-head attention only (the layout has no place for shared k/v heads)."""

    megatron: str
    hf: str
    split: Split = Split.COLUMN

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def _check(self, arch):
        if arch.num_query_groups != arch.num_attention_heads:
            raise UnsupportedModelError(f"{self.hf}: a per-head fused q/k/v tensor needs one key/value head per query head")

    def hf_to_megatron(self, tensors, arch):
        self._check(arch)
        return layouts.per_head_qkv_to_megatron(tensors[0], arch.num_attention_heads)

    def megatron_to_hf(self, tensor, arch):
        self._check(arch)
        return [layouts.megatron_to_per_head_qkv(tensor, arch.num_attention_heads)]


# The expert index in the names of a routed expert's rows (``...local_experts.<e>.linear_fc1.weight`` <-
# ``...experts.<e>.gate_proj.weight``): the sharding engine repeats such a row for every expert of the layer.
EXPERT = "<e>"


def layer_names(pattern: str, layer: int | None, expert: int | None = None) -> str:
    """``pattern`` with its ``*`` replaced by ``layer`` (unchanged for a row outside the decoder layers) and its
    ``<e>`` by ``expert``."""
    name = pattern if layer is None else pattern.replace("*", str(layer), 1)
    return name if expert is None else name.replace(EXPERT, str(expert))


def is_expert_row(row: Row) -> bool:
    """A routed expert's weight: one parameter per expert, placed on expert-parallel ranks."""
    return EXPERT in row.megatron


# Which decoder layers a row belongs to in a mixture-of-experts model, by its megatron name: the router, the routed
# and the shared experts live in MoE layers only, the dense MLP (``mlp.linear_fc1`` ...) in dense layers only.
MOE_MODULES = (".mlp.router.", ".mlp.experts.", ".mlp.shared_experts.")
DENSE_MLP = ".mlp.linear_fc"


def row_kind(row: Row) -> str:
    """``moe`` (a MoE layer's MLP), ``dense`` (a dense layer's MLP) or ``any`` (attention, norms, outside layers)."""
    if any(module in row.megatron for module in MOE_MODULES):
        return "moe"
    return "dense" if DENSE_MLP in row.megatron else "any"
