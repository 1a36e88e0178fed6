"""The ``legacy`` format: one ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` per TP x PP (x EP) rank, each holding
that rank's shards under its state-dict names (Transformer Engine spelling for TE models), as Megatron-LM writes
them. With expert parallelism every EP rank's file holds the non-expert weights and its own routed experts,
numbered from 0 (``local_experts.0`` is global expert ``ep_rank * num_experts / EP``)."""

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
        self._stages: dict[tuple[int, int], list[dict]] = {}  # (pp rank, ep rank) -> the TP ranks' state dicts
        for pp_rank in range(saved.pp):  # open everything first: a missing shard fails before any work
            for ep_rank in range(saved.ep):
                self._stages[pp_rank, ep_rank] = [
                    load_legacy_rank(iter_dir, t, pp_rank, saved.pp, ep_rank if saved.ep > 1 else None)
                    for t in range(saved.tp)]

        # Where each parameter was saved, by its global name: a load at another PP (EP) numbers layers (experts)
        # differently. A weight every EP rank holds is read from EP rank 0's files.
        self._where = {}
        for stage in range(saved.pp):
            for ep_rank in reversed(range(saved.ep)):
                self._where.update({e.global_name: ((stage, ep_rank), e) for e in saved.stage_entries(stage, ep_rank)})
        for stage in self._stages:
            self._check_stage(stage)

    def _stored_name(self, entry) -> str:
        return te_name(entry.local_name) if self.te else entry.local_name

    def _check_stage(self, stage: tuple[int, int]) -> None:
        """Every rank file of a stage holds exactly the tensors the recorded configuration places there, each
        floating point with its TP shard's shape: a file that disagrees with ``megatron_patch.json`` would
        otherwise export a broken model."""
        pp_rank, ep_rank = stage
        entries = self.saved.stage_entries(pp_rank, ep_rank)
        for tp_rank, rank_sd in enumerate(self._stages[stage]):
            where = f"legacy checkpoint {self.dir} (TP rank {tp_rank}, PP rank {pp_rank}, EP rank {ep_rank})"
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

    def _where_saved(self, global_name: str) -> tuple[tuple[int, int], Entry]:
        tied = self.saved.arch.tie_word_embeddings
        if global_name not in self._where and global_name.startswith("output_layer.") and tied:
            # Tied weights saved on a single stage have no separate output layer: it is the word embedding.
            global_name = "embedding.word_embeddings." + global_name.removeprefix("output_layer.")
        if global_name not in self._where:
            raise CheckpointError(f"legacy checkpoint {self.dir} holds no '{global_name}'")
        return self._where[global_name]

    def _stored(self, global_name: str) -> list[torch.Tensor]:
        stage, entry = self._where_saved(global_name)
        name = self._stored_name(entry)
        shards = []
        for rank_sd in self._stages[stage]:
            if name not in rank_sd:
                raise CheckpointError(f"legacy checkpoint stage {stage[0]} (EP rank {stage[1]}) has no tensor '{name}'")
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
            for ep_rank in range(sharding.ep):
                for tp_rank in range(sharding.tp):
                    state_dict = {}
                    for entry in sharding.stage_entries(pp_rank, ep_rank):
                        shard = sharding.rank_view(entry, [source.get(name) for name in entry.hf_names], tp_rank)
                        state_dict[rename(entry.local_name)] = own_storage(sharding.checked(entry, shard))
                        if progress is not None:
                            progress.update(1)
                    save_legacy_rank(iter_dir, tp_rank, pp_rank, sharding.pp, state_dict,
                                     ep_rank=ep_rank if sharding.ep > 1 else None, megatron_lm=megatron_lm)
                    del state_dict

    def write_steps(self, sharding):
        return sharding.tp * sum(len(sharding.stage_entries(s, e)) for s in range(sharding.pp)
                                 for e in range(sharding.ep))

    def open_reader(self, iter_dir, saved, transformer_impl):
        return LegacyReader(iter_dir, saved, transformer_impl)

    def export_dtype(self, saved_dtype):
        return None  # legacy files keep each tensor's own dtype

    def load_into_model(self, model, iter_dir, saved, target, tp_rank, pp_rank, transformer_impl, ep_rank=0):
        reader = LegacyReader(iter_dir, saved, transformer_impl)

        def tensors():
            for entry in target.stage_entries(pp_rank, ep_rank):
                full = reader.full(entry.global_name)
                yield entry.local_name, split_for_tp(full, entry.row.split, target.tp)[tp_rank]

        fill_model(model, tensors(), f"legacy checkpoint {iter_dir}")
