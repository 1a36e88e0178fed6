"""Declarative weight-mapping rows: one megatron-core parameter <- one or more HF tensors.

A row names the megatron parameter (local-spec name, ``*`` for the layer index), the HF tensor(s) it is made
from (``*`` for the same global layer index), how the full tensor is split across TP ranks, and a pair of pure
transforms on full tensors: ``hf_to_megatron`` and its exact inverse ``megatron_to_hf``. Sharding, PP placement
and vocabulary padding are not a row's business: ``engine.py`` does them once for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layouts

# How a full megatron tensor is split across tensor-parallel ranks.
COLUMN = "column"  # dim 0 (linear_qkv, linear_fc1 without GLU)
ROW = "row"  # dim 1 (linear_proj, linear_fc2)
REPLICATED = "replicated"  # norms, row-parallel biases
VOCAB = "vocab"  # dim 0, after padding the vocabulary (word embeddings, output layer)
GATED = "gated"  # SwiGLU fc1: each rank holds [gate_r; up_r]
SPLITS = (COLUMN, ROW, REPLICATED, VOCAB, GATED)


@dataclass(frozen=True)
class Direct:
    """A tensor that is the same in both layouts (up to TP sharding)."""

    megatron: str
    hf: str
    split: str = REPLICATED

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def shards_inputs(self) -> bool:
        """True when a TP rank's shard is the transform of its own part of each input (see engine.rank_shard)."""
        return self.split in (COLUMN, ROW)

    def hf_to_megatron(self, tensors: list[torch.Tensor], arch) -> torch.Tensor:
        return tensors[0]

    def megatron_to_hf(self, tensor: torch.Tensor, arch) -> list[torch.Tensor]:
        return [tensor]


@dataclass(frozen=True)
class QKV:
    """Separate HF q/k/v projections (weight or bias) <-> megatron-core's per-group fused ``linear_qkv``."""

    megatron: str
    q: str
    k: str
    v: str
    split: str = COLUMN
    shards_inputs = True  # a rank holds whole query groups: its q, k and v rows are contiguous in HF's layout

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def hf_to_megatron(self, tensors, arch):
        return layouts.interleave_qkv(*tensors, arch.num_query_groups)

    def megatron_to_hf(self, tensor, arch):
        return list(layouts.split_qkv(tensor, arch.num_attention_heads, arch.num_query_groups))


@dataclass(frozen=True)
class GatedMLP:
    """Separate HF gate and up projections <-> megatron-core's fused SwiGLU ``linear_fc1`` = [gate; up]."""

    megatron: str
    gate: str
    up: str
    split: str = GATED
    shards_inputs = True  # rank r holds [gate_r; up_r]

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def hf_to_megatron(self, tensors, arch):
        return torch.cat(tensors, dim=0)

    def megatron_to_hf(self, tensor, arch):
        return list(torch.chunk(tensor, 2, dim=0))


@dataclass(frozen=True)
class FusedQKV:
    """One HF tensor holding [q; k; v] as three consecutive blocks (Baichuan ``W_pack``, Qwen v1 ``c_attn``)
    <-> megatron-core's per-group ``linear_qkv`` (weight or bias)."""

    megatron: str
    hf: str
    split: str = COLUMN

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def hf_to_megatron(self, tensors, arch):
        return layouts.qkv_blocks_to_megatron(tensors[0], arch.num_attention_heads, arch.num_query_groups)

    def megatron_to_hf(self, tensor, arch):
        return [layouts.megatron_to_qkv_blocks(tensor, arch.num_attention_heads, arch.num_query_groups)]


@dataclass(frozen=True)
class PerHeadQKV:
    """One HF tensor holding (q_h, k_h, v_h) per head (bloom ``query_key_value``) <-> megatron-core's
    ``linear_qkv``; multi-head attention only (the layout has no place for shared k/v heads)."""

    megatron: str
    hf: str
    split: str = COLUMN

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def _check(self, arch):
        if arch.num_query_groups != arch.num_attention_heads:
            raise ValueError(f"{self.hf}: a per-head fused q/k/v tensor needs one key/value head per query head")

    def hf_to_megatron(self, tensors, arch):
        self._check(arch)
        return layouts.per_head_qkv_to_megatron(tensors[0], arch.num_attention_heads)

    def megatron_to_hf(self, tensor, arch):
        self._check(arch)
        return [layouts.megatron_to_per_head_qkv(tensor, arch.num_attention_heads)]


def layer_names(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.replace("*", str(layer), 1)


def is_layer_row(row) -> bool:
    return "*" in row.megatron
