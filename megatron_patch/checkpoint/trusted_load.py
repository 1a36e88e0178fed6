"""Refuse a torch_dist checkpoint that would run code when megatron-core loads it.

megatron-core reads a torch_dist directory through ``torch.distributed.checkpoint``: the ``.metadata`` file is
read with plain ``pickle.load`` and every byte item (``ShardedObject``s: ``_extra_state``, RNG states) with an
unrestricted ``torch.load`` (its weights-only check switched off). Either runs arbitrary code from a crafted file. Neither library can be told to
load safely, so this module inspects the same bytes *before* megatron-core sees them:

- ``.metadata`` is unpickled by an unpickler that resolves only the checkpoint-metadata classes of
  ``torch.distributed.checkpoint`` (and ``torch.Size`` / dtypes); any other global is refused;
- every byte item the metadata lists is read from its ``.distcp`` file and loaded with ``weights_only=True``
  (tensors, containers and numbers only; plus numpy's RNG-state array types, which older training checkpoints hold);
- ``common.pt`` is loaded with ``weights_only=True``.

Once these pass, megatron-core's own unrestricted loads can only rebuild what the restricted ones allowed.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError

# (module, name) pairs a torch DCP ``.metadata`` pickle may name (torch 2.4 .. 2.14 write these).
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"),  # maps a layout name such as "torch.strided" to the layout object
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id when the writer was given a Path
    ("pathlib", "PurePosixPath"),
})
_DTYPE_NAMES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self._path} names '{module}.{name}', which a torch_dist checkpoint's metadata never holds; refusing to "
            "load it (a crafted or foreign file?)")


def read_dcp_metadata(path: str | os.PathLike):
    """The ``torch.distributed.checkpoint`` Metadata in ``path`` (a ``.metadata`` file), unpickled with an
    allow-list; raises CheckpointError for anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, path).load()
    except CheckpointError:
        raise
    except Exception as error:  # pickle raises many types for a damaged file
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {error}") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata")
    _check_storage_data(path, metadata)
    return metadata


def _check_storage_data(path: Path, metadata) -> None:
    """Every item (tensor and byte items alike) names a data file inside the checkpoint directory, at a
    non-negative offset and length: a ``relative_path`` of ``../../elsewhere/x.distcp`` is refused, not read."""
    files: dict[str, int] = {}  # data file -> the bytes its items need
    for index, info in metadata.storage_data.items():
        relative, offset, length = (getattr(info, name, None) for name in ("relative_path", "offset", "length"))
        numbers_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length))
        if not isinstance(relative, str) or not relative or not numbers_ok:
            raise CheckpointError(f"{path}: item '{getattr(index, 'fqn', index)}' names no valid data file, offset "
                                  f"and length ({relative!r:.60}, {offset!r:.20}, {length!r:.20})")
        files[relative] = max(files.get(relative, 0), offset + length)
    for relative, needed in files.items():
        where = path.parent / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts or where.resolve().parent != path.parent.resolve():
            raise CheckpointError(f"{path} names data file {relative!r} outside {path.parent}; refusing to read it "
                                  "(a crafted checkpoint?)")
        # Missing or cut short (an interrupted copy): said now, naming the file, not as an EOFError mid-load.
        size = where.stat().st_size if where.is_file() else None
        if size is None or size < needed:
            state = "is missing" if size is None else f"is truncated ({size} of at least {needed} bytes)"
            raise CheckpointError(f"torch_dist checkpoint {path.parent}: data file {relative} {state}")


def _numpy_rng_globals() -> list:
    """numpy types inside ``np.random.get_state()`` (pickled in RNG states of older training checkpoints)."""
    import numpy as np

    reconstruct = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed = [reconstruct._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(code)) for code in ("uint32", "int64", "float64")]
    return allowed


def megatron_lm_args_globals() -> list[type]:
    """The types Megatron-LM pickles into a checkpoint's ``args`` besides plain data and torch dtypes: the
    ``argparse.Namespace`` itself and the values of megatron-core's enum flags (``--attention-backend``,
    ``--fp8-recipe``, the model type, CUDA-graph scopes). An enum member is unpickled by looking its value up in the
    class: no code of the file's choosing runs."""
    import argparse
    import enum

    from megatron.core import enums as core_enums
    from megatron.core.transformer import enums as transformer_enums

    found: list[type] = [argparse.Namespace]
    for module in (core_enums, transformer_enums):
        found += [value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__ == module.__name__]
    return found


def _load_weights_only(stream, what: str) -> None:
    try:
        # common.pt of a Megatron-LM torch_dist checkpoint carries the run's args.
        with torch.serialization.safe_globals(_numpy_rng_globals() + megatron_lm_args_globals()):
            torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unpickling refused"
        raise CheckpointError(f"{what} holds an object outside tensors and plain data ({first}); refusing to "
                              "load it (a crafted or foreign file?)") from None
    except Exception as error:
        raise CheckpointError(f"cannot read {what} (truncated or corrupt?): {error}") from None


def _check_byte_items(ckpt_dir: Path, metadata) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if getattr(index, "fqn", None) not in byte_keys:
            continue
        what = f"{ckpt_dir / info.relative_path} item '{index.fqn}'"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{what} is stored with transforms {list(info.transform_descriptors)}, which "
                                  "megatron-patch cannot check; refusing to load it")
        file = (ckpt_dir / info.relative_path).resolve()
        if file.parent != ckpt_dir.resolve() or not file.is_file():
            raise CheckpointError(f"{what}: data file missing or outside the checkpoint directory")
        with open(file, "rb") as stream:
            stream.seek(info.offset)
            data = stream.read(info.length)
        if len(data) != info.length:
            raise CheckpointError(f"{what} is truncated ({len(data)} of {info.length} bytes)")
        _load_weights_only(io.BytesIO(data), what)


def check_torch_dist_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Raise CheckpointError unless every pickle megatron-core would read from ``ckpt_dir`` holds only checkpoint
    metadata, tensors and plain data. Call before ``dist_checkpointing.load`` (which trusts them blindly)."""
    ckpt_dir = Path(ckpt_dir)
    metadata_files = sorted(ckpt_dir.glob("*.metadata"))
    if not (ckpt_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a torch_dist checkpoint (no .metadata)")
    for path in metadata_files:
        metadata = read_dcp_metadata(path)
        _check_byte_items(ckpt_dir, metadata)
    common = ckpt_dir / "common.pt"
    if not common.is_file():  # megatron-core reads it first and fails with a bare FileNotFoundError deep in a load
        raise CheckpointError(f"{ckpt_dir} has no common.pt, which every torch_dist checkpoint holds (an incomplete "
                              "copy?)")
    _load_weights_only(common, str(common))
