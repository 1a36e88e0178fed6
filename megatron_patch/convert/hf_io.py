"""HuggingFace checkpoint directories: lazy tensor reads, sharded safetensors writes, non-weight assets."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a HuggingFace model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


class MappedSafetensors:
    """Zero-copy view of a ``.safetensors`` file: tensors are views of a private memory map of the file.

    ``safe_open(...).get_tensor`` copies each tensor into fresh memory; converting one rank's shard of a tensor
    would then hold a full copy per process. Here a tensor costs page cache only until it is transformed or cloned.
    """

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}

    def __init__(self, path: Path):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
            if not 0 < header_len <= size - 8:
                raise CheckpointError(f"cannot read shard {path}: truncated or not a safetensors file")
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"cannot read shard {path}: corrupt header") from None
            header.pop("__metadata__", None)
            self._base = 8 + header_len
            self._entries = header
            data_end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if self._base + data_end > size:
                raise CheckpointError(f"shard {path} is truncated ({size} bytes, the header promises "
                                      f"{self._base + data_end})")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return self._DTYPES[self._entries[name]["dtype"]]

    def __getitem__(self, name: str) -> torch.Tensor:
        entry, dtype, shape = self._entries[name], self.dtype(name), self.shape(name)
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # ACCESS_COPY maps are writable; torch warns only for read-only buffers
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + entry["data_offsets"][0])
        return flat.view(shape)


class _TorchShard:
    """A ``pytorch_model*.bin`` shard, memory-mapped by ``torch.load(mmap=True)``."""

    def __init__(self, path: Path):
        self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class HFCheckpointReader:
    """Reads tensors by name from a HF directory without loading the whole model.

    Shards (``*.safetensors`` or ``pytorch_model*.bin``) are memory-mapped; every shard the index names is opened
    up front, so a missing or truncated file fails before any work starts.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, MappedSafetensors | _TorchShard] = {}
        self._open_all()

    def _open_all(self) -> None:
        if (self.dir / SAFE_INDEX).is_file():
            files = self._from_index(SAFE_INDEX)
        elif (self.dir / "model.safetensors").is_file():
            files = [self.dir / "model.safetensors"]
        elif (self.dir / BIN_INDEX).is_file():
            files = self._from_index(BIN_INDEX)
        elif (self.dir / "pytorch_model.bin").is_file():
            files = [self.dir / "pytorch_model.bin"]
        else:
            raise CheckpointError(f"{self.dir} has no model.safetensors, safetensors index or pytorch_model.bin")
        for path in files:
            for name in self._open(path).keys():
                self._where[name] = path

    def _from_index(self, index_name: str) -> list[Path]:
        index = json.loads((self.dir / index_name).read_text())
        files = sorted({self.dir / f for f in index["weight_map"].values()})
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"shard {path.name} listed in {index_name} is missing from {self.dir}")
        return files

    def _open(self, path: Path):
        if path.suffix == ".safetensors":
            handle = MappedSafetensors(path)
        else:
            try:
                handle = _TorchShard(path)
            except Exception as error:  # torch raises several types for a damaged file
                raise CheckpointError(f"cannot read shard {path} (truncated or corrupt?): {error}") from None
        self._handles[path] = handle
        return handle

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self._lookup(name)].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._handles[self._lookup(name)].dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored: a view of the mapped file (clone it before writing to it or keeping it)."""
        return self._handles[self._lookup(name)][name]

    def _lookup(self, name: str) -> Path:
        if name not in self._where:
            raise CheckpointError(f"the HF checkpoint in {self.dir} has no tensor '{name}' (does config.json match the weights?)")
        return self._where[name]


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000X-of-0000N.safetensors`` files of at most ``max_shard_bytes`` plus the index.

    Tensors are buffered only up to one shard; the file names are fixed once all shards are known.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self.max_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        temp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(self.dir / temp_name), metadata={"format": "pt"})
        self._shards.append((temp_name, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, (temp_name, names) in enumerate(self._shards):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.dir / temp_name, self.dir / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy every non-weight file of a HF directory (config, generation config, tokenizer files)."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in (SAFE_INDEX, BIN_INDEX):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
