"""Megatron checkpoints in Megatron-LM's layout: ``latest_checkpointed_iteration.txt`` + ``release/`` or
``iter_NNNNNNN/``, each iteration directory holding one checkpoint format's files (see ``formats``) and, when this
toolkit wrote it, ``megatron_patch.json`` (family, HF config, vocabulary and parallel sizes) and ``hf_assets/``
(config and tokenizer files), so it converts back to HF with no other input.

Storage only: nothing here knows model families (``models.Checkpoint`` turns the metadata into a ``ModelSpec``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .bulk_file import BulkFile
from .serialization import without_crc32
from .trusted_load import megatron_lm_args_globals

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_patch.json"
ASSETS = "hf_assets"
EXTRA_STATE = "_extra_state"  # Transformer Engine / megatron module state that carries no weights
TRANSFORMER_IMPLS = ("local", "transformer_engine")

# What megatron_patch.json holds (and its readers rely on), with the JSON type of each value.
META_FIELDS = {
    "format": str,
    "family": str,
    "hf_config": dict,
    "tensor_model_parallel_size": int,
    "pipeline_model_parallel_size": int,
    "vocab_size": int,
    "extra_vocab_size": int,
    "padded_vocab_size": int,
    "make_vocab_size_divisible_by": int,
    "dtype": str,
}

# Files by which an iteration directory of Megatron-LM or Megatron-Bridge is recognised without our metadata.
# Records of checkpoints whose tensors are not the plain GPTModel that megatron_patch.json describes: LoRA adapters
# only (layers/lora_config.LORA_META) or a scalar reward head (rlhf/preference/reward_model.REWARD_MARKER). Their tensors are
# checked against the model built for them, when it loads.
MODEL_VARIANT_RECORDS = ("lora.json", "reward_model.json")

_ITERATION_MARKERS = (".metadata", "common.pt", "run_config.yaml", "mp_rank_00")


def is_model_variant(iter_dir: str | os.PathLike) -> bool:
    return any((Path(iter_dir) / record).is_file() for record in MODEL_VARIANT_RECORDS)


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_tracker(root: str | os.PathLike) -> int | str:
    """The iteration ``root/latest_checkpointed_iteration.txt`` names: ``"release"`` or a number."""
    tracker = Path(root) / TRACKER
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        return text
    try:
        iteration = int(text)
    except ValueError:
        iteration = -1
    if iteration < 0:
        raise CheckpointError(f"{tracker} holds {text[:40]!r}; expected 'release' or an iteration number")
    return iteration


def find_iteration_dir(path: str | os.PathLike) -> Path:
    """The iteration directory of a Megatron checkpoint: ``path`` itself if it is one (holds our metadata or a
    checkpoint format's files), otherwise the one ``latest_checkpointed_iteration.txt`` names."""
    path = Path(path)
    if (path / META).is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        if path.is_dir() and any((path / marker).exists() for marker in _ITERATION_MARKERS):
            return path
        raise CheckpointError(f"{path} is not a Megatron checkpoint (no {TRACKER})")
    iter_dir = path / iteration_dir_name(read_tracker(path))
    if not iter_dir.is_dir():
        raise CheckpointError(f"{tracker} names {iter_dir.name}, but {iter_dir} does not exist")
    return iter_dir


def assets_root(iter_dir: str | os.PathLike, assets_dir: str | os.PathLike) -> Path:
    """Where the files of ``assets_dir`` must lie (see ``hf.asset_files``): inside the iteration directory for its
    own ``hf_assets/`` (a link out of the checkpoint is refused), inside ``assets_dir`` itself for a directory the
    user named (``--hf-config``, ``--tokenizer-model``)."""
    return Path(iter_dir) if Path(assets_dir) == Path(iter_dir) / ASSETS else Path(assets_dir)


def read_meta(iter_dir: str | os.PathLike) -> dict:
    """``megatron_patch.json`` of an iteration directory, checked: valid JSON, every field present with its type.
    The format name is checked by ``formats.get_format`` (the registry knows the valid names)."""
    path = Path(iter_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{iter_dir} has no {META}; was it written by megatron-patch?")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({' '.join(str(error).split())})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object (got {type(meta).__name__})")
    missing = [key for key in META_FIELDS if key not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    for key, kind in META_FIELDS.items():
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise CheckpointError(f"{path}: '{key}' must be a JSON {kind.__name__} (got {meta[key]!r:.60})")
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{path}: 'dtype' {meta['dtype']!r} is not a floating-point torch dtype")
    _check_meta_ranges(path, meta)
    if meta.get("transformer_impl", "local") not in TRANSFORMER_IMPLS:
        raise CheckpointError(f"{path}: 'transformer_impl' must be one of {', '.join(TRANSFORMER_IMPLS)}")
    iteration = meta.get("iteration", "release")
    if iteration != "release" and not _is_count(iteration):
        raise CheckpointError(f"{path}: 'iteration' must be 'release' or an iteration number >= 0 "
                              f"(got {iteration!r:.60})")
    return meta


def _check_meta_ranges(path: Path, meta: dict) -> None:
    """The numbers of ``megatron_patch.json`` within their ranges and consistent with each other and with its HF
    config (a negative vocabulary or ``divisible_by: 0`` was used as is; the HF config's sizes are the family's to
    check, and the stored tensors' shapes are checked against them before anything is built)."""
    for key, least in (("tensor_model_parallel_size", 1), ("pipeline_model_parallel_size", 1), ("vocab_size", 1),
                       ("extra_vocab_size", 0), ("make_vocab_size_divisible_by", 1)):
        if meta[key] < least:
            raise CheckpointError(f"{path}: '{key}' must be >= {least} (got {meta[key]})")
    if meta["padded_vocab_size"] < meta["vocab_size"]:
        raise CheckpointError(f"{path}: 'padded_vocab_size' {meta['padded_vocab_size']} is smaller than "
                              f"'vocab_size' {meta['vocab_size']}")
    hf_vocab = meta["hf_config"].get("vocab_size")
    if _is_count(hf_vocab) and hf_vocab + meta["extra_vocab_size"] != meta["vocab_size"]:
        raise CheckpointError(f"{path}: 'vocab_size' {meta['vocab_size']} is not the HF config's {hf_vocab} plus "
                              f"'extra_vocab_size' {meta['extra_vocab_size']}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_meta(iter_dir: str | os.PathLike, meta: dict) -> None:
    (Path(iter_dir) / META).write_text(json.dumps(meta, indent=2) + "\n")


# --- legacy mp_rank_* files ---------------------------------------------------------------------------------------


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int | None = None) -> str:
    """Megatron-LM's names: ``mp_rank_TT``, ``mp_rank_TT_PPP`` with PP > 1, then ``_EEE`` with EP > 1 (``ep_rank``
    given only then)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_rank is None else f"{name}_{ep_rank:03d}"


def save_legacy_rank(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, state_dict: dict, iteration=0,
                     ep_rank: int | None = None, megatron_lm: dict | None = None) -> None:
    """One ``model_optim_rng.pt``; ``megatron_lm``: Megatron-LM's ``args`` / ``checkpoint_version`` / ``iteration``
    (``megatron_lm_args.megatron_lm_common``), stored beside the model as Megatron-LM stores them."""
    rank_dir = iter_dir / legacy_rank_dir(tp_rank, pp_rank, pp, ep_rank)
    rank_dir.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint_version": 3.0, "iteration": 0 if iteration == "release" else iteration,
               **(megatron_lm or {}), "model": state_dict}
    with without_crc32(), BulkFile(rank_dir / "model_optim_rng.pt") as out:
        torch.save(payload, out)


def legacy_rank_file(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, ep_rank: int | None = None) -> Path:
    return Path(iter_dir) / legacy_rank_dir(tp_rank, pp_rank, pp, ep_rank) / "model_optim_rng.pt"


def load_legacy_rank(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, ep_rank: int | None = None) -> dict:
    """The ``model`` state dict of one rank file, memory-mapped (``weights_only=True``: tensors and plain data, plus
    the ``args`` Megatron-LM stores beside the model: ``trusted_load.megatron_lm_args_globals``)."""
    path = legacy_rank_file(iter_dir, tp_rank, pp_rank, pp, ep_rank)
    if not path.is_file():
        raise CheckpointError(f"legacy checkpoint shard {path} is missing")
    payload = load_legacy_payload(path, allowed_globals=_args_globals_if_named(path))
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path} holds no 'model' state dict (keys: {', '.join(map(str, payload))[:120]})")
    return payload["model"]


def _args_globals_if_named(path: Path) -> tuple:
    """``megatron_lm_args_globals()`` for a file whose pickle names globals beyond plain data (Megatron-LM's, with
    its ``args``), nothing for one that names none, the namespace alone for one whose args hold plain values (ours):
    building the list imports megatron-core, 3.6 s of a 13 s export of 5 GB. The scan reads the pickle's opcodes only (torch >= 2.5; older torch always gets the list)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        if scan is not None:
            named = set(scan(path))
            if not named:
                return ()
            if named == {"argparse.Namespace"}:  # ours (megatron_lm_args: plain values only), no megatron-core
                return (argparse.Namespace,)
    except Exception:  # noqa: BLE001  a damaged file: the weights-only load reports it
        pass
    return tuple(megatron_lm_args_globals())


def load_legacy_payload(path: Path, allowed_globals: tuple = ()) -> dict:
    """A whole ``model_optim_rng.pt`` (memory-mapped), unpickling nothing but tensors, plain data and
    ``allowed_globals`` (Megatron-LM's files carry an ``argparse.Namespace`` of the run's arguments)."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"cannot read {path} (truncated, corrupt or holding objects other than tensors and "
                              f"plain data): {_reason(error)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(payload).__name__})")
    return payload


def _reason(error: Exception) -> str:
    """The informative line of a torch.load error (its weights-only refusals name the global after a preamble)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    named = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (named or lines)[0][:300]


# --- loading into a live model ------------------------------------------------------------------------------------


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
            raise CheckpointError(f"{what}: '{name}' has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(target.shape)}")
        with torch.no_grad():
            target.data.copy_(tensor)
        filled.add(name)
    missing = [n for n in state if n not in filled and not n.endswith(EXTRA_STATE)]
    if missing:
        raise CheckpointError(f"{what}: no weights for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
