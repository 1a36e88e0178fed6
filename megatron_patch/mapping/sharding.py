"""The sharding engine: applies a family's mapping rows for any TP x PP, in both directions, for every family.

Directions are named ``hf_to_megatron`` and ``megatron_to_hf``. Megatron names here are local-spec names with
stage-local layer numbers (what a rank's ``state_dict()`` holds); ``te_name`` gives the Transformer-Engine
spelling used by legacy checkpoints of TE models and by megatron-core's sharded state dict.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import CheckpointError, ConfigError
from . import layouts
from .pieces import Pieces, export_pieces
from .rows import Row, Split, is_expert_row, layer_names, row_kind

# --- the split table ----------------------------------------------------------------------------------------------

SplitFn = Callable[[torch.Tensor, int], list[torch.Tensor]]
MergeFn = Callable[[list[torch.Tensor]], torch.Tensor]

SPLITS: dict[Split, tuple[SplitFn, MergeFn]] = {
    Split.COLUMN: (lambda t, tp: layouts.split_tp(t, tp, 0), lambda shards: layouts.merge_tp(shards, 0)),
    Split.VOCAB: (lambda t, tp: layouts.split_tp(t, tp, 0), lambda shards: layouts.merge_tp(shards, 0)),
    Split.ROW: (lambda t, tp: layouts.split_tp(t, tp, 1), lambda shards: layouts.merge_tp(shards, 1)),
    Split.GATED: (layouts.split_gated, layouts.merge_gated),
    # Every rank holds the whole tensor; merging takes rank 0's (they are equal by construction).
    Split.REPLICATED: (lambda t, tp: [t] * tp, lambda shards: shards[0]),
}

# The dim along which a row whose ``shards_inputs`` is true splits each of its HF inputs.
INPUT_SPLIT_DIM = {Split.COLUMN: 0, Split.GATED: 0, Split.ROW: 1}


def split_for_tp(tensor: torch.Tensor, split: Split, tp: int) -> list[torch.Tensor]:
    """The ``tp`` shards of a full megatron tensor (views; clone before persisting one)."""
    return SPLITS[split][0](tensor, tp)


def merge_for_tp(shards: list[torch.Tensor], split: Split) -> torch.Tensor:
    """Inverse of ``split_for_tp``."""
    return SPLITS[split][1](shards)


# --- names ----------------------------------------------------------------------------------------------------------

# With the TE spec the pre-attention / pre-MLP norms are fused into the following linear layer.
_TE_RENAMES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".input_layernorm.bias": ".self_attention.linear_qkv.layer_norm_bias",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
    ".pre_mlp_layernorm.bias": ".mlp.linear_fc1.layer_norm_bias",
}


def te_name(local_name: str) -> str:
    """A local-spec parameter name in Transformer Engine's spelling (the norms live inside the linears)."""
    for local, te in _TE_RENAMES.items():
        if local_name.endswith(local):
            return local_name[: -len(local)] + te
    return local_name


class ArchShape(Protocol):
    """The architecture facts the engine reads (``models.ModelArch`` provides them)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    gated_linear_unit: bool
    tie_word_embeddings: bool
    # Mixture of experts (``models.ModelArch``; 0 experts for a dense model).
    num_experts: int
    moe_ffn_hidden_size: int
    moe_shared_expert_intermediate_size: int

    def check_parallel(self, tp: int, pp: int) -> None: ...

    def check_expert_parallel(self, ep: int) -> None: ...

    def is_moe_layer(self, layer: int) -> bool: ...


def _ffn_width(name: str, arch: ArchShape) -> int:
    """The FFN width of the MLP a parameter belongs to: a routed expert's, the shared expert's or the dense one."""
    if ".mlp.experts." in name:
        return arch.moe_ffn_hidden_size
    if ".mlp.shared_experts." in name:
        return arch.moe_shared_expert_intermediate_size
    return arch.ffn_hidden_size


def megatron_shape(name: str, arch: ArchShape, vocab_rows: int) -> tuple[int, ...]:
    """The full (unsharded, TP=1) shape of a megatron-core GPT parameter given the architecture."""
    h, d = arch.hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    ffn = _ffn_width(name, arch)
    fc1 = ffn * (2 if arch.gated_linear_unit else 1)
    suffixes = [
        ("mlp.router.weight", (getattr(arch, "num_experts", 0), h)),
        ("shared_experts.gate_weight", (1, h)),
        ("word_embeddings.weight", (vocab_rows, h)),
        ("output_layer.weight", (vocab_rows, h)),
        ("linear_qkv.weight", (qkv, h)),
        ("linear_qkv.bias", (qkv,)),
        ("linear_proj.weight", (h, arch.num_attention_heads * d)),
        ("linear_fc1.weight", (fc1, h)),
        ("linear_fc1.bias", (fc1,)),
        ("linear_fc2.weight", (h, ffn)),
        ("q_layernorm.weight", (d,)),
        ("k_layernorm.weight", (d,)),
        ("q_layernorm.bias", (d,)),
        ("k_layernorm.bias", (d,)),
    ]
    for suffix, shape in suffixes:
        if name.endswith(suffix):
            return shape
    return (h,)  # norms and the hidden-size biases (linear_proj.bias, linear_fc2.bias)


def _owned(tensor: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """``tensor`` when it is a new tensor spanning exactly its own storage, else a copy of it.

    A shard is persisted: saving a view writes its whole storage, and a view of an input keeps the memory-mapped
    file alive. A layout that already built a new tensor (fused QKV, [gate; up]) is not copied a second time."""
    storage = tensor.untyped_storage()
    fresh = (tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
             and all(storage.data_ptr() != source.untyped_storage().data_ptr() for source in sources))
    return tensor if fresh and tensor.device.type != "meta" else tensor.clone()


# --- the engine -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One megatron parameter on one pipeline stage (and, for a routed expert's weight, one expert-parallel rank)."""

    row: Row
    layer: int | None  # global layer id for decoder rows
    local_name: str  # name in the stage's state_dict (stage-local layer id, rank-local expert id)
    expert: int | None = None  # global expert id for expert rows

    @property
    def global_name(self) -> str:
        return layer_names(self.row.megatron, self.layer, self.expert)

    @property
    def hf_names(self) -> list[str]:
        return [layer_names(name, self.layer, self.expert) for name in self.row.hf_names]


class TensorSource(Protocol):
    """Named full tensors (an HF checkpoint reader, or a view of one)."""

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class Sharding:
    """A model's rows placed on TP x PP ranks.

    ``arch.vocab_size + extra_vocab_size`` rows are real tokens; ``padded_vocab_size`` is what the megatron
    embedding holds (the padding rows no token id reaches). Validated on construction: TP and PP must split the
    model, and TP the padded vocabulary.
    """

    rows: tuple[Row, ...]
    arch: ArchShape
    tp: int
    pp: int
    padded_vocab_size: int
    extra_vocab_size: int = 0
    # Called as check(description, tensor) on every megatron tensor ``hf_to_megatron`` / ``full_megatron_tensor``
    # produce, while it is fresh (e.g. ``checks.NonFiniteGuard``); see ``with_tensor_check``.
    tensor_check: Callable[[str, torch.Tensor], None] | None = dataclasses.field(default=None, compare=False)
    ep: int = 1  # expert-parallel ranks: each holds num_experts / ep whole routed experts of every MoE layer

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        self.arch.check_parallel(self.tp, self.pp)
        if self.ep != 1 or self.num_experts:
            self.arch.check_expert_parallel(self.ep)
        if self.extra_vocab_size < 0:
            raise ConfigError(f"extra vocabulary size must be >= 0 (got {self.extra_vocab_size})")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"{self.padded_vocab_size} vocabulary rows cannot hold {self.vocab_size} tokens")
        if self.padded_vocab_size % self.tp:
            raise ConfigError(f"the checkpoint's {self.padded_vocab_size} vocabulary rows cannot be split over "
                             f"TP={self.tp}")

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size + self.extra_vocab_size

    def with_tensor_check(self, check: Callable[[str, torch.Tensor], None] | None) -> Sharding:
        """The same sharding, calling ``check(description, tensor)`` on each megatron tensor it builds."""
        return dataclasses.replace(self, tensor_check=check)

    def checked(self, entry: Entry, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a megatron tensor of ``entry``, or a part of one), after ``tensor_check`` saw it."""
        if self.tensor_check is not None:
            self.tensor_check(f"{entry.global_name} (from {', '.join(entry.hf_names)})", tensor)
        return tensor

    @property
    def num_experts(self) -> int:
        return getattr(self.arch, "num_experts", 0)

    def retarget(self, tp: int, pp: int, ep: int | None = None) -> Sharding:
        """The same model (rows, vocabulary as padded) on another TP x PP (x EP; default: this one's)."""
        return dataclasses.replace(self, tp=tp, pp=pp, ep=self.ep if ep is None else ep)

    # --- placement -------------------------------------------------------------------------------------------

    def _row_on_stage(self, row: Row, pp_rank: int) -> bool:
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        if row.megatron.startswith("embedding."):
            return first
        if row.megatron.startswith("output_layer."):
            # Tied: the output layer shares the embedding's storage on a single stage (no separate parameter),
            # but the last of several stages keeps its own copy, synchronised by megatron-core.
            return last and (not self.arch.tie_word_embeddings or not first)
        return last

    def row_on_layer(self, row: Row, layer: int) -> bool:
        """A MoE model's router / experts are in its MoE layers, its dense MLP in the others (``rows.row_kind``)."""
        kind = row_kind(row)
        if kind == "any" or not self.num_experts:
            return kind != "moe"
        return (kind == "moe") == self.arch.is_moe_layer(layer)

    def experts_on(self, ep_rank: int | None) -> range:
        """The global ids of the routed experts expert-parallel rank ``ep_rank`` holds (all of them for None)."""
        if ep_rank is None:
            return range(self.num_experts)
        local = self.num_experts // self.ep
        return range(ep_rank * local, (ep_rank + 1) * local)

    def stage_entries(self, pp_rank: int, ep_rank: int | None = None) -> list[Entry]:
        """The parameters of pipeline stage ``pp_rank``: with ``ep_rank`` those of that expert-parallel rank (its
        routed experts numbered from 0, as its state_dict numbers them), else every expert under its global id."""
        layers = layouts.pp_layer_range(self.arch.num_layers, self.pp, pp_rank)
        experts = self.experts_on(ep_rank)
        entries = []
        for row in self.rows:
            if row.is_layer_row:
                for g in layers:
                    if not self.row_on_layer(row, g):
                        continue
                    if is_expert_row(row):
                        entries += [Entry(row, g, layer_names(row.megatron, g - layers.start, e - experts.start), e)
                                    for e in experts]
                    else:
                        entries.append(Entry(row, g, layer_names(row.megatron, g - layers.start)))
            elif self._row_on_stage(row, pp_rank):
                entries.append(Entry(row, None, row.megatron))
        return entries

    def export_entries(self) -> list[Entry]:
        """One entry per HF tensor group, in HF order of layers; tied output layer omitted."""
        entries = [e for stage in range(self.pp) for e in self.stage_entries(stage)]
        if self.arch.tie_word_embeddings:
            entries = [e for e in entries if not e.row.megatron.startswith("output_layer.")]
        return entries

    # --- hf_to_megatron ----------------------------------------------------------------------------------

    def full_megatron_tensor(self, entry: Entry, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """The full (TP=1) megatron tensor of an entry, checked by ``tensor_check``."""
        return self.checked(entry, self._full(entry, hf_tensors))

    def _full(self, entry: Entry, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        full = entry.row.hf_to_megatron(hf_tensors, self.arch)
        if entry.row.split is Split.VOCAB:
            full = layouts.pad_vocab(layouts.extend_vocab(full, self.extra_vocab_size), self.padded_vocab_size)
        return full

    def rank_shard(self, entry: Entry, hf_tensors: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of an entry as a new tensor (see ``rank_view``)."""
        return _owned(self.rank_view(entry, hf_tensors, tp_rank), hf_tensors)

    def rank_view(self, entry: Entry, hf_tensors: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of an entry: a view of ``hf_tensors`` where the layout allows it, and never
        the full tensor where the row allows that (``hf_tensors`` are views of memory-mapped files, so untouched
        parts are never read). For a writer that stores the shard at once; ``rank_shard`` returns an owned copy."""
        row = entry.row
        if row.split is Split.VOCAB:
            rows = self.padded_vocab_size // self.tp
            source = row.hf_to_megatron(hf_tensors, self.arch)
            return layouts.vocab_rows(source, self.extra_vocab_size, self.padded_vocab_size,
                                      tp_rank * rows, (tp_rank + 1) * rows)
        if self.tp > 1 and row.shards_inputs:
            dim = INPUT_SPLIT_DIM[row.split]
            parts = [layouts.split_tp(t, self.tp, dim)[tp_rank] for t in hf_tensors]
            return row.hf_to_megatron(parts, self.rank_arch)
        full = self._full(entry, hf_tensors)
        return split_for_tp(full, row.split, self.tp)[tp_rank]

    @property
    def rank_arch(self):
        """The architecture as one TP rank sees it (its share of heads, groups and FFN width)."""
        arch = self.arch
        return dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // self.tp,
                                   num_query_groups=arch.num_query_groups // self.tp,
                                   ffn_hidden_size=arch.ffn_hidden_size // self.tp)

    def hf_to_megatron(
        self, reader: TensorSource, pp_rank: int, tp_ranks: list[int] | None = None, progress=None
    ) -> Iterator[tuple[str, dict[int, torch.Tensor]]]:
        """Yield (local name, {tp_rank: shard}) for every parameter of stage ``pp_rank``; shards are owned copies."""
        tp_ranks = list(range(self.tp)) if tp_ranks is None else tp_ranks
        for entry in self.stage_entries(pp_rank):
            hf_tensors = [reader.get(n) for n in entry.hf_names]
            yield entry.local_name, {r: self.checked(entry, self.rank_shard(entry, hf_tensors, r)) for r in tp_ranks}
            if progress is not None:
                progress.update(1)

    # --- megatron_to_hf ----------------------------------------------------------------------------------

    def megatron_to_hf(self, get_full, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor). ``get_full(entry)`` returns the full (TP-merged) megatron tensor of an entry."""
        for entry in self.export_entries():
            yield from zip(entry.hf_names, self._full_to_hf(entry, get_full(entry)))
            if progress is not None:
                progress.update(1)

    def megatron_to_hf_pieces(self, get_shards, progress=None) -> Iterator[tuple[str, Pieces]]:
        """``megatron_to_hf`` for a writer that copies bytes: yield (HF name, ``Pieces``), each HF tensor as the
        runs of shard rows it is made of, without merging the shards or building the HF tensors.
        ``get_shards(entry)`` returns the stored TP shards of an entry (a full tensor is one shard)."""
        for entry in self.export_entries():
            shards = get_shards(entry)
            merge = SPLITS[entry.row.split][1] if len(shards) > 1 else (lambda single: single[0])
            pieces = export_pieces(shards, merge, functools.partial(self._full_to_hf, entry))
            yield from zip(entry.hf_names, pieces)
            if progress is not None:
                progress.update(1)

    def _full_to_hf(self, entry: Entry, full: torch.Tensor) -> list[torch.Tensor]:
        if entry.row.split is Split.VOCAB:
            full = layouts.unpad_vocab(full, self.vocab_size)
        return entry.row.megatron_to_hf(full, self.arch)

    def check_megatron_shapes(self, get_full) -> None:
        """Check before any work that every exported parameter is floating point with the shape the architecture
        implies; ``get_full(entry)`` may return meta tensors."""
        for entry in self.export_entries():
            tensor = get_full(entry)
            if not tensor.dtype.is_floating_point:
                raise CheckpointError(f"the checkpoint's {entry.global_name} has dtype {tensor.dtype}; a weight must "
                                      "be floating point")
            got = tuple(tensor.shape)
            expected = megatron_shape(entry.global_name, self.arch, self.padded_vocab_size)
            if got != expected:
                raise CheckpointError(f"the checkpoint's {entry.global_name} has shape {got}; its recorded "
                                      f"configuration implies {expected}")
