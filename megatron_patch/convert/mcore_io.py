"""Megatron checkpoints in Megatron-LM's layout: ``latest_checkpointed_iteration.txt`` + ``release/`` or
``iter_NNNNNNN/``, holding either megatron-core ``dist_checkpointing`` (torch_dist) or legacy
``mp_rank_TT[_PPP]/model_optim_rng.pt`` files. Each iteration directory also holds ``megatron_patch.json``
(family, HF config, vocabulary and parallel sizes) and ``hf_assets/`` (config and tokenizer files), so a
checkpoint converts back to HF with no other input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from .engine import ConversionPlan, merge_for_tp, split_for_tp, te_name
from .hf_io import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_patch.json"
ASSETS = "hf_assets"
FORMATS = ("torch_dist", "legacy")
EXTRA_STATE = "_extra_state"  # Transformer Engine / megatron module state that carries no weights


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The iteration directory of a Megatron checkpoint: ``path`` itself if it holds our metadata, otherwise
    the one ``latest_checkpointed_iteration.txt`` names."""
    path = Path(path)
    if (path / META).is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"{path} is not a Megatron checkpoint (no {TRACKER})")
    iteration = tracker.read_text().strip()
    iter_dir = path / iteration_dir_name(iteration if iteration == "release" else int(iteration))
    if not (iter_dir / META).is_file():
        raise CheckpointError(f"{iter_dir} has no {META}; was it written by megatron-patch?")
    return iter_dir


def read_meta(iter_dir: str | os.PathLike) -> dict:
    return json.loads((Path(iter_dir) / META).read_text())


def write_meta(iter_dir: Path, plan: ConversionPlan, fmt: str, transformer_impl: str, hf_config: dict,
               dtype: torch.dtype, iteration: int | str = "release") -> None:
    meta = {
        "format": fmt,
        "family": plan.family.name,
        "iteration": iteration,
        "tensor_model_parallel_size": plan.tp,
        "pipeline_model_parallel_size": plan.pp,
        "transformer_impl": transformer_impl,
        "vocab_size": plan.vocab_size,
        "extra_vocab_size": plan.extra_vocab_size,
        "padded_vocab_size": plan.padded_vocab_size,
        "make_vocab_size_divisible_by": plan.make_vocab_size_divisible_by,
        "dtype": str(dtype).removeprefix("torch."),
        "hf_config": hf_config,
    }
    (iter_dir / META).write_text(json.dumps(meta, indent=2) + "\n")


def plan_from_meta(meta: dict, tp: int | None = None, pp: int | None = None) -> ConversionPlan:
    """The plan a checkpoint was written with, optionally re-targeted to another TP x PP (keeping its rows)."""
    from ..models import get_family

    family = get_family(meta["family"])
    return ConversionPlan(
        family=family,
        arch=family.arch_from_hf(meta["hf_config"]),
        tp=tp or meta["tensor_model_parallel_size"],
        pp=pp or meta["pipeline_model_parallel_size"],
        make_vocab_size_divisible_by=meta["make_vocab_size_divisible_by"],
        extra_vocab_size=meta["extra_vocab_size"],
        saved_padded_vocab_size=meta["padded_vocab_size"],
    )


# --- atomic output directories ----------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {path} exists and is not empty (pass --overwrite to replace it)")


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have given.

    Temporary files and directories (``mkstemp``, ``mkdtemp``) are created 0600 / 0700, so a checkpoint written
    through one and renamed into place would be private to its owner; on a shared cluster filesystem colleagues
    and serving jobs under another uid must be able to read it, as they can any file the user writes.
    """
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``path``, on any error it is removed.

    The output gets the modes the umask gives (not the 0700 / 0600 of temporary files).
    """
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    finished = False
    try:
        yield temp
        finished = True
    finally:
        if not finished:  # an error or an interrupt: leave nothing behind
            shutil.rmtree(temp, ignore_errors=True)
    apply_umask_modes(temp)
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(temp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, path)


# --- legacy format ----------------------------------------------------------------------------------------------


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_legacy_rank(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, state_dict: dict, iteration=0) -> None:
    rank_dir = iter_dir / legacy_rank_dir(tp_rank, pp_rank, pp)
    rank_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model": state_dict, "checkpoint_version": 3.0, "iteration": 0 if iteration == "release" else iteration}
    torch.save(payload, rank_dir / "model_optim_rng.pt")


def load_legacy_rank(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int) -> dict:
    path = iter_dir / legacy_rank_dir(tp_rank, pp_rank, pp) / "model_optim_rng.pt"
    if not path.is_file():
        raise CheckpointError(f"legacy checkpoint shard {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {error}") from None


class LegacyReader:
    """Full (TP-merged) megatron tensors from a legacy checkpoint, one entry at a time (shards memory-mapped)."""

    def __init__(self, iter_dir: Path, plan: ConversionPlan, transformer_impl: str):
        self.dir, self.plan, self.te = Path(iter_dir), plan, transformer_impl == "transformer_engine"
        self._stages: dict[int, list[dict]] = {}
        for pp_rank in range(plan.pp):  # open everything first: a missing shard fails before any work
            self._stages[pp_rank] = [load_legacy_rank(iter_dir, t, pp_rank, plan.pp) for t in range(plan.tp)]

        # Where each parameter was saved, by its global name: a load at another PP numbers layers differently.
        self._saved = {e.global_name: (stage, e) for stage in range(plan.pp) for e in plan.stage_entries(stage)}

    def full(self, global_name: str) -> torch.Tensor:
        """The TP-merged tensor of a parameter, e.g. ``decoder.layers.5.mlp.linear_fc1.weight`` (global layer id)."""
        shards, split = self._shards(global_name)
        return merge_for_tp(shards, split)

    def meta(self, global_name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype ``full`` returns (no tensor data is read)."""
        shards, split = self._shards(global_name)
        return merge_for_tp([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in shards], split)

    def _shards(self, global_name: str) -> tuple[list[torch.Tensor], str]:
        if global_name not in self._saved and global_name.startswith("output_layer.") and self.plan.arch.tie_word_embeddings:
            # Tied weights saved on a single stage have no separate output layer: it is the word embedding.
            global_name = "embedding.word_embeddings." + global_name.removeprefix("output_layer.")
        if global_name not in self._saved:
            raise CheckpointError(f"legacy checkpoint {self.dir} holds no '{global_name}'")
        pp_rank, entry = self._saved[global_name]
        name = te_name(entry.local_name) if self.te else entry.local_name
        shards = []
        for rank_sd in self._stages[pp_rank]:
            if name not in rank_sd:
                raise CheckpointError(f"legacy checkpoint stage {pp_rank} has no tensor '{name}'")
            shards.append(rank_sd[name])
        return shards, entry.row.split


# --- loading into a live model (any TP x PP) ---------------------------------------------------------------------


def fill_model(model: torch.nn.Module, tensors, what: str) -> None:
    """Copy (name, tensor) pairs into ``model``'s parameters; every parameter must be filled exactly once.

    Strict like ``load_state_dict(strict=True)``, but copies one tensor at a time (no second full state dict).
    Only ``_extra_state`` entries may stay unfilled.
    """
    state = model.state_dict(keep_vars=True)
    filled = set()
    for name, tensor in tensors:
        if name not in state:
            raise CheckpointError(f"{what}: unexpected tensor '{name}' for this model")
        target = state[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.data.copy_(tensor)
        filled.add(name)
    missing = [n for n in state if n not in filled and not n.endswith(EXTRA_STATE)]
    if missing:
        raise CheckpointError(f"{what}: no weights for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))


def load_checkpoint_into_model(model: torch.nn.Module, iter_dir: Path, strict: bool = True) -> dict:
    """Load a megatron-patch checkpoint (either format, any saved TP x PP) into this rank's model stage."""
    from megatron.core import dist_checkpointing, parallel_state

    iter_dir = Path(iter_dir)
    meta = read_meta(iter_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if meta["format"] == "torch_dist":
        check_torch_dist_checkpoint(iter_dir)  # megatron-core unpickles without restriction: vet the bytes first
        state = dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir))
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as error:
            raise CheckpointError(f"torch_dist checkpoint {iter_dir} does not match the model: "
                                  f"{' '.join(str(error).split())[:300]}") from None
        return meta
    saved = plan_from_meta(meta)
    target = plan_from_meta(meta, tp=tp, pp=pp)
    reader = LegacyReader(iter_dir, saved, meta["transformer_impl"])

    def tensors():
        for entry in target.stage_entries(pp_rank):
            full = reader.full(entry.global_name)
            yield entry.local_name, split_for_tp(full, entry.row.split, tp)[tp_rank]

    fill_model(model, tensors(), f"legacy checkpoint {iter_dir}")
    return meta
