"""The ``legacy`` format: one ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per TP x PP rank, each holding that rank's
shards under its state-dict names (Transformer Engine spelling for TE models), as Megatron-LM writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..mapping import Entry, Sharding, megatron_shape, merge_for_tp, split_for_tp, te_name
from ..mapping.checks import check_exact_names
from .formats import CheckpointFormat, register_format
from .megatron import fill_model, load_legacy_rank, save_legacy_rank
from .serialization import own_storage, prefault


class LegacyReader:
    """Full (TP-merged) megatron tensors from a legacy checkpoint, one entry at a time (shards memory-mapped)."""

    def __init__(self, iter_dir: Path, saved: Sharding, transformer_impl: str):
        self.dir, self.saved, self.te = Path(iter_dir), saved, transformer_impl == "transformer_engine"
        self._stages: dict[int, list[dict]] = {}
        for pp_rank in range(saved.pp):  # open everything first: a missing shard fails before any work
            self._stages[pp_rank] = [load_legacy_rank(iter_dir, t, pp_rank, saved.pp) for t in range(saved.tp)]

        # Where each parameter was saved, by its global name: a load at another PP numbers layers differently.
        self._where = {e.global_name: (stage, e) for stage in range(saved.pp) for e in saved.stage_entries(stage)}
        for pp_rank in range(saved.pp):
            self._check_stage(pp_rank)

    def _stored_name(self, entry) -> str:
        return te_name(entry.local_name) if self.te else entry.local_name

    def _check_stage(self, pp_rank: int) -> None:
        """Every rank file of a stage holds exactly the tensors the recorded configuration places there, each
        floating point with its TP shard's shape: a file that disagrees with ``megatron_patch.json`` would
        otherwise export a broken model."""
        entries = self.saved.stage_entries(pp_rank)
        for tp_rank, rank_sd in enumerate(self._stages[pp_rank]):
            where = f"legacy checkpoint {self.dir} (TP rank {tp_rank}, PP rank {pp_rank})"
            check_exact_names(rank_sd, [self._stored_name(e) for e in entries], where)
            for entry in entries:
                name, tensor = self._stored_name(entry), rank_sd[self._stored_name(entry)]
                if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
                    kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise CheckpointError(f"{where}: '{name}' is {kind}; a weight must be a floating-point tensor")
                full = torch.empty(megatron_shape(entry.global_name, self.saved.arch, self.saved.padded_vocab_size),
                                   device="meta")
                expected = tuple(split_for_tp(full, entry.row.split, self.saved.tp)[tp_rank].shape)
                if tuple(tensor.shape) != expected:
                    raise CheckpointError(f"{where}: '{name}' has shape {tuple(tensor.shape)}; its recorded "
                                          f"configuration implies {expected}")

    def full(self, global_name: str) -> torch.Tensor:
        """The TP-merged tensor of a parameter, e.g. ``decoder.layers.5.mlp.linear_fc1.weight`` (global layer id)."""
        return merge_for_tp(self.shards(global_name), self._where_saved(global_name)[1].row.split)

    def meta(self, global_name: str) -> torch.Tensor:
        shards = self._stored(global_name)
        split = self._where_saved(global_name)[1].row.split
        return merge_for_tp([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in shards], split)

    def shards(self, global_name: str) -> list[torch.Tensor]:
        """The TP shards of a parameter, in TP rank order: views of the memory-mapped rank files, their pages
        mapped in one call each (``prefault``) since the caller reads them whole."""
        return [prefault(shard) for shard in self._stored(global_name)]

    def _where_saved(self, global_name: str) -> tuple[int, Entry]:
        tied = self.saved.arch.tie_word_embeddings
        if global_name not in self._where and global_name.startswith("output_layer.") and tied:
            # Tied weights saved on a single stage have no separate output layer: it is the word embedding.
            global_name = "embedding.word_embeddings." + global_name.removeprefix("output_layer.")
        if global_name not in self._where:
            raise CheckpointError(f"legacy checkpoint {self.dir} holds no '{global_name}'")
        return self._where[global_name]

    def _stored(self, global_name: str) -> list[torch.Tensor]:
        pp_rank, entry = self._where_saved(global_name)
        name = self._stored_name(entry)
        shards = []
        for rank_sd in self._stages[pp_rank]:
            if name not in rank_sd:
                raise CheckpointError(f"legacy checkpoint stage {pp_rank} has no tensor '{name}'")
            shards.append(rank_sd[name])
        return shards


@register_format("legacy")
class LegacyFormat(CheckpointFormat):
    def write(self, sharding, source, iter_dir, *, dtype, transformer_impl, progress=None, megatron_lm=None):
        """One rank file at a time, in this process: memory holds one rank's tensors. A rank reads only its part
        of each HF tensor (the tensors are views of memory-mapped files), so every byte is read once over all ranks,
        and a shard that is a contiguous piece of an HF tensor is saved straight from the mapped file (no copy).
        Tensors keep the HF checkpoint's dtype (``dtype`` is that dtype)."""
        rename = te_name if transformer_impl == "transformer_engine" else (lambda name: name)
        for pp_rank in range(sharding.pp):
            for tp_rank in range(sharding.tp):
                state_dict = {}
                for entry in sharding.stage_entries(pp_rank):
                    shard = sharding.rank_view(entry, [source.get(name) for name in entry.hf_names], tp_rank)
                    state_dict[rename(entry.local_name)] = own_storage(sharding.checked(entry, shard))
                    if progress is not None:
                        progress.update(1)
                save_legacy_rank(iter_dir, tp_rank, pp_rank, sharding.pp, state_dict, megatron_lm=megatron_lm)
                del state_dict

    def write_steps(self, sharding):
        return sharding.tp * sum(len(sharding.stage_entries(s)) for s in range(sharding.pp))

    def open_reader(self, iter_dir, saved, transformer_impl):
        return LegacyReader(iter_dir, saved, transformer_impl)

    def export_dtype(self, saved_dtype):
        return None  # legacy files keep each tensor's own dtype

    def load_into_model(self, model, iter_dir, saved, target, tp_rank, pp_rank, transformer_impl):
        reader = LegacyReader(iter_dir, saved, transformer_impl)

        def tensors():
            for entry in target.stage_entries(pp_rank):
                full = reader.full(entry.global_name)
                yield entry.local_name, split_for_tp(full, entry.row.split, target.tp)[tp_rank]

        fill_model(model, tensors(), f"legacy checkpoint {iter_dir}")
