"""The sharding engine: applies a family's mapping rows for any TP x PP, in both directions, for every family.

Directions are named ``hf_to_megatron`` and ``megatron_to_hf``. Megatron names here are local-spec names with
stage-local layer numbers (what a rank's ``state_dict()`` holds); ``te_name`` gives the Transformer-Engine
spelling used by legacy checkpoints of TE models.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import layouts
from .hf_io import CheckpointError, HFCheckpointReader
from .mapping import COLUMN, GATED, REPLICATED, ROW, VOCAB, is_layer_row, layer_names

# With the TE spec the pre-attention / pre-MLP norms are fused into the following linear layer.
_TE_RENAMES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".input_layernorm.bias": ".self_attention.linear_qkv.layer_norm_bias",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
    ".pre_mlp_layernorm.bias": ".mlp.linear_fc1.layer_norm_bias",
}


def te_name(local_name: str) -> str:
    for local, te in _TE_RENAMES.items():
        if local_name.endswith(local):
            return local_name[: -len(local)] + te
    return local_name


def split_for_tp(tensor: torch.Tensor, split: str, tp: int) -> list[torch.Tensor]:
    if split in (COLUMN, VOCAB):
        return layouts.split_tp(tensor, tp, 0)
    if split == ROW:
        return layouts.split_tp(tensor, tp, 1)
    if split == GATED:
        return layouts.split_gated(tensor, tp)
    if split == REPLICATED:
        return [tensor] * tp
    raise ValueError(f"unknown split '{split}'")


def merge_for_tp(shards: list[torch.Tensor], split: str) -> torch.Tensor:
    if split in (COLUMN, VOCAB):
        return layouts.merge_tp(shards, 0)
    if split == ROW:
        return layouts.merge_tp(shards, 1)
    if split == GATED:
        return layouts.merge_gated(shards)
    if split == REPLICATED:
        return shards[0]
    raise ValueError(f"unknown split '{split}'")


@dataclass(frozen=True)
class Entry:
    """One megatron parameter on one pipeline stage."""

    row: object
    layer: int | None  # global layer id for decoder rows
    local_name: str  # name in the stage's state_dict (stage-local layer id)

    @property
    def global_name(self) -> str:
        return layer_names(self.row.megatron, self.layer)

    @property
    def hf_names(self) -> list[str]:
        return [layer_names(name, self.layer) for name in self.row.hf_names]


class PrefixTolerantReader:
    """A view of an HF checkpoint in which tensors saved without ``prefix`` answer to their prefixed names.

    Some hub repositories were saved from the base model rather than the ``*ForCausalLM`` wrapper (bloom's hold
    ``h.0...`` for ``transformer.h.0...``); transformers loads both spellings, and so does the converter. Exports
    always use the prefixed names.
    """

    def __init__(self, reader: HFCheckpointReader, prefix: str):
        self.reader, self.prefix = reader, prefix

    def _stored(self, name: str) -> str:
        if name not in self.reader and name.startswith(self.prefix) and name[len(self.prefix):] in self.reader:
            return name[len(self.prefix):]
        return name

    def names(self) -> list[str]:
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        return self._stored(name) in self.reader

    def shape(self, name: str):
        return self.reader.shape(self._stored(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self._stored(name))

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._stored(name))


@dataclass
class ConversionPlan:
    """Everything needed to place a family's weights on TP x PP ranks.

    ``vocab_size`` counts real tokens (the HF vocabulary plus ``extra_vocab_size`` new ones);
    ``padded_vocab_size`` is what the megatron embedding holds.
    """

    family: object
    arch: object
    tp: int
    pp: int
    make_vocab_size_divisible_by: int = 128
    extra_vocab_size: int = 0
    rows: list = field(default_factory=list)
    saved_padded_vocab_size: int | None = None  # set when loading a checkpoint: its rows are kept as saved

    def __post_init__(self):
        self.arch.check_parallel(self.tp, self.pp)
        if self.extra_vocab_size < 0:
            raise ValueError(f"extra vocabulary size must be >= 0 (got {self.extra_vocab_size})")
        if not self.rows:
            self.rows = self.family.weight_mapping(self.arch)
        if self.padded_vocab_size % self.tp:
            raise ValueError(f"the checkpoint's {self.padded_vocab_size} vocabulary rows cannot be split over TP={self.tp}")

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size + self.extra_vocab_size

    @property
    def padded_vocab_size(self) -> int:
        if self.saved_padded_vocab_size is not None:
            return self.saved_padded_vocab_size
        return layouts.padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tp)

    def open_hf(self, hf_dir) -> HFCheckpointReader | PrefixTolerantReader:
        """A reader of ``hf_dir`` that also finds tensors stored without the family's optional name prefix."""
        reader = HFCheckpointReader(hf_dir)
        prefix = self.family.optional_hf_prefix
        return PrefixTolerantReader(reader, prefix) if prefix else reader

    # --- placement -------------------------------------------------------------------------------------------

    def _row_on_stage(self, row, pp_rank: int) -> bool:
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        if row.megatron.startswith("embedding."):
            return first
        if row.megatron.startswith("output_layer."):
            # Tied: the output layer shares the embedding's storage on a single stage (no separate parameter),
            # but the last of several stages keeps its own copy, synchronised by megatron-core.
            return last and (not self.arch.tie_word_embeddings or not first)
        return last

    def stage_entries(self, pp_rank: int) -> list[Entry]:
        layers = layouts.pp_layer_range(self.arch.num_layers, self.pp, pp_rank)
        entries = []
        for row in self.rows:
            if is_layer_row(row):
                entries += [Entry(row, g, layer_names(row.megatron, g - layers.start)) for g in layers]
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
        full = entry.row.hf_to_megatron(hf_tensors, self.arch)
        if entry.row.split == VOCAB:
            full = layouts.pad_vocab(layouts.extend_vocab(full, self.extra_vocab_size), self.padded_vocab_size)
        return full

    def rank_shard(self, entry: Entry, hf_tensors: list[torch.Tensor], tp_rank: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of an entry as a new tensor, without materialising the full tensor where the
        row allows it (``hf_tensors`` are views of memory-mapped files, so untouched parts are never read)."""
        row = entry.row
        if row.split == VOCAB:
            rows = self.padded_vocab_size // self.tp
            source = row.hf_to_megatron(hf_tensors, self.arch)
            return layouts.vocab_rows(source, self.extra_vocab_size, self.padded_vocab_size,
                                      tp_rank * rows, (tp_rank + 1) * rows)
        if self.tp > 1 and getattr(row, "shards_inputs", False):
            dim = 1 if row.split == ROW else 0
            parts = [layouts.split_tp(t, self.tp, dim)[tp_rank] for t in hf_tensors]
            return row.hf_to_megatron(parts, self.rank_arch).clone()
        full = self.full_megatron_tensor(entry, hf_tensors)
        return split_for_tp(full, row.split, self.tp)[tp_rank].clone()

    @property
    def rank_arch(self):
        """The architecture as one TP rank sees it (its share of heads, groups and FFN width)."""
        arch = self.arch
        return dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // self.tp,
                                   num_query_groups=arch.num_query_groups // self.tp,
                                   ffn_hidden_size=arch.ffn_hidden_size // self.tp)

    def hf_to_megatron(
        self, reader: HFCheckpointReader, pp_rank: int, tp_ranks: list[int] | None = None, progress=None
    ) -> Iterator[tuple[str, dict[int, torch.Tensor]]]:
        """Yield (local name, {tp_rank: shard}) for every parameter of stage ``pp_rank``; shards are owned copies."""
        tp_ranks = list(range(self.tp)) if tp_ranks is None else tp_ranks
        for entry in self.stage_entries(pp_rank):
            hf_tensors = [reader.get(n) for n in entry.hf_names]
            yield entry.local_name, {r: self.rank_shard(entry, hf_tensors, r) for r in tp_ranks}
            if progress is not None:
                progress.update(1)

    # --- megatron_to_hf ----------------------------------------------------------------------------------

    def megatron_to_hf(self, get_full, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor). ``get_full(entry)`` returns the full (TP-merged) megatron tensor of an entry."""
        for entry in self.export_entries():
            full = get_full(entry)
            if entry.row.split == VOCAB:
                full = layouts.unpad_vocab(full, self.vocab_size)
            yield from zip(entry.hf_names, entry.row.megatron_to_hf(full, self.arch))
            if progress is not None:
                progress.update(1)

    def check_megatron_shapes(self, get_full) -> None:
        """Check before any work that every exported parameter has the shape the architecture implies;
        ``get_full(entry)`` may return meta tensors."""
        for entry in self.export_entries():
            got = tuple(get_full(entry).shape)
            expected = megatron_shape(entry.global_name, self.arch, self.padded_vocab_size)
            if got != expected:
                raise CheckpointError(f"the checkpoint's {entry.global_name} has shape {got}; its recorded "
                                      f"configuration implies {expected}")

    # --- validation ------------------------------------------------------------------------------------------

    def validate_hf(self, reader: HFCheckpointReader) -> None:
        """Check before any work: every tensor the mapping needs exists with the shape the config implies, and
        no tensor is left unconverted. Runs the transforms on meta tensors, so nothing is read."""
        ignored = [re.compile(p) for p in self.family.ignored_hf_keys]
        prefix = self.family.optional_hf_prefix
        used: set[str] = set()
        for stage in range(self.pp):
            for entry in self.stage_entries(stage):
                names = entry.hf_names
                for name in names:
                    if name not in reader:
                        raise CheckpointError(f"the HF checkpoint has no tensor '{name}' (does config.json match the weights?)")
                    if not reader.dtype(name).is_floating_point:
                        raise CheckpointError(f"the HF tensor '{name}' has dtype {reader.dtype(name)}; a weight "
                                              "must be floating point")
                used.update(names)
                metas = [torch.empty(reader.shape(n), device="meta") for n in names]
                expected = megatron_shape(entry.global_name, self.arch, self.arch.vocab_size)
                try:
                    got = tuple(entry.row.hf_to_megatron(metas, self.arch).shape)
                except RuntimeError:
                    got = None
                if got != expected:
                    shapes = ", ".join(f"{n} {tuple(reader.shape(n))}" for n in names)
                    raise CheckpointError(f"config.json does not match the weights: {shapes} cannot form "
                                          f"{entry.global_name} of shape {expected}")
        unused = [n for n in reader.names()
                  if n not in used and prefix + n not in used and not any(p.fullmatch(n) for p in ignored)]
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise CheckpointError(f"the HF checkpoint has tensors config.json does not account for: "
                                  f"{', '.join(sorted(unused)[:3])}{more}")


def megatron_shape(name: str, arch, vocab_rows: int) -> tuple[int, ...]:
    """The full (unsharded, TP=1) shape of a megatron-core GPT parameter given the architecture."""
    h, d = arch.hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    fc1 = arch.ffn_hidden_size * (2 if arch.gated_linear_unit else 1)
    suffixes = [
        ("word_embeddings.weight", (vocab_rows, h)),
        ("output_layer.weight", (vocab_rows, h)),
        ("linear_qkv.weight", (qkv, h)),
        ("linear_qkv.bias", (qkv,)),
        ("linear_proj.weight", (h, arch.num_attention_heads * d)),
        ("linear_fc1.weight", (fc1, h)),
        ("linear_fc1.bias", (fc1,)),
        ("linear_fc2.weight", (h, arch.ffn_hidden_size)),
        ("q_layernorm.weight", (d,)),
        ("k_layernorm.weight", (d,)),
        ("q_layernorm.bias", (d,)),
        ("k_layernorm.bias", (d,)),
    ]
    for suffix, shape in suffixes:
        if name.endswith(suffix):
            return shape
    return (h,)  # norms and the hidden-size biases (linear_proj.bias, linear_fc2.bias)
