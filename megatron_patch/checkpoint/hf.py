"""HuggingFace checkpoint directories: lazy tensor reads, sharded safetensors writes, non-weight assets."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..mapping import Pieces
from .bulk_file import BulkFile
from .checksums import MANIFEST, verify_manifest
from .paths import check_inside
from .serialization import prefault

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a HuggingFace model directory")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({_one_line(error)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (got {type(config).__name__})")
    return config


# safetensors dtype names -> torch dtypes (FP8 and unsigned ints exist only in newer torch releases).
_SAFETENSORS_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
        "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    }.items()
    if hasattr(torch, attr)
}


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_WRITE_BATCH_BYTES = 1 << 20  # fits a core's L2 cache


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


class _SafetensorsShard:
    """One ``.safetensors`` file, read through the safetensors library.

    ``safe_open`` validates the whole header when the file is opened (JSON object, known dtypes, ``data_offsets``
    contiguous, in bounds and matching each shape), so a damaged file fails here, before any work, with one line.
    Names, shapes and dtypes are kept from that first open; ``get`` opens the file again and returns the tensor as
    a view of a private memory map: it costs page cache only for the pages the caller touches, and the mapping
    goes away with the tensor (the converter holds one parameter's tensors at a time).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as handle:
                slices = {name: handle.get_slice(name) for name in handle.keys()}
                self._info = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
        except Exception as error:  # SafetensorError, OSError, or a dtype this safetensors build does not know
            raise CheckpointError(f"cannot read shard {path}: {_one_line(error)}") from None
        unknown = sorted({dtype for _, dtype in self._info.values() if dtype not in _SAFETENSORS_DTYPES})
        if unknown:
            raise CheckpointError(f"shard {path} stores dtype {', '.join(unknown)}, which torch "
                                  f"{torch.__version__} cannot represent")

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._info[name][1]]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as error:  # the file changed or vanished since it was validated
            raise CheckpointError(f"cannot read '{name}' from {self.path}: {_one_line(error)}") from None


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
    (and its header validated) up front, so a missing, truncated or corrupt file fails before any work starts.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        verify_manifest(self.dir)  # an HF directory this toolkit wrote: every file as it was written
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, _SafetensorsShard | _TorchShard] = {}
        self._open_all()

    def _open_all(self) -> None:
        index_name = None
        if (self.dir / SAFE_INDEX).is_file():
            index_name = SAFE_INDEX
        elif (self.dir / "model.safetensors").is_file():
            files = [self.dir / "model.safetensors"]
        elif (self.dir / BIN_INDEX).is_file():
            index_name = BIN_INDEX
        elif (self.dir / "pytorch_model.bin").is_file():
            files = [self.dir / "pytorch_model.bin"]
        else:
            raise CheckpointError(f"{self.dir} has no model.safetensors, safetensors index or pytorch_model.bin")
        if index_name is not None:
            files = self._from_index(index_name)
        for path in files:
            for name in self._open(path).keys():
                if name in self._where:
                    raise CheckpointError(f"tensor '{name}' is stored twice in {self.dir} ({self._where[name].name} "
                                          f"and {path.name})")
                self._where[name] = path
        if index_name is not None:
            self._check_index(index_name)

    def _check_index(self, index_name: str) -> None:
        """The index lists exactly the tensors the shards hold, each in the shard that holds it (transformers loads
        through the index: a tensor it does not list is silently left at its initial value there)."""
        listed = {name: self.dir / file for name, file in self._weight_map.items()}
        unlisted = sorted(set(self._where) - set(listed))
        absent = sorted(name for name, path in listed.items() if self._where.get(name) != path)
        if unlisted or absent:
            what = (f"does not list {len(unlisted)} stored tensor(s), e.g. '{unlisted[0]}'" if unlisted
                    else f"places '{absent[0]}' in {listed[absent[0]].name}, which does not hold it")
            raise CheckpointError(f"{self.dir / index_name} {what}; the index and the shards disagree")

    def _from_index(self, index_name: str) -> list[Path]:
        path = self.dir / index_name
        try:
            index = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is not valid JSON ({_one_line(error)})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{path} has no 'weight_map' object of tensor name -> shard file")
        for name in set(weight_map.values()):
            # Lexical check only: hub caches keep shards as symlinks into a blob store, which is fine.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{index_name} names shard {name!r} outside {self.dir}")
        self._weight_map = weight_map
        files = sorted({self.dir / f for f in weight_map.values()})
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"shard {path.name} listed in {index_name} is missing from {self.dir}")
        return files

    def _open(self, path: Path):
        if path.suffix == ".safetensors":
            handle = _SafetensorsShard(path)
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
        """The tensor as stored: a view of a private map of the file (pages are read when touched; writes stay
        private; the map is released with the tensor)."""
        return prefault(self._handles[self._lookup(name)][name])

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


class StreamingSafetensorsWriter:
    """Writes sharded safetensors files (plus the index) while the tensors are produced, one at a time; a tensor
    may come as ``Pieces`` (the runs of TP shards it is made of), written with one gathered write per 1024 runs.

    ``safetensors.torch.save_file`` needs every tensor of a file in memory at once (up to 5 GB per shard); the
    converters know every tensor's name, dtype and shape before reading any data, so this writer takes that layout
    up front, writes each file's header first and then appends the tensors in the announced order. The files are
    plain safetensors (8-byte header length, JSON header padded to 8 bytes, little-endian data) that
    ``safe_open`` validates. Call ``add`` in layout order, then ``close``.
    """

    def __init__(self, out_dir: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self._layout = [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        self._shards: list[list[int]] = [[]]  # indices into the layout, per file
        size = 0
        for i, (_, dtype, shape) in enumerate(self._layout):
            nbytes = math.prod(shape) * dtype.itemsize
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(i)
            size += nbytes
        count = len(self._shards)
        self._files = ["model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                       for i in range(count)]
        self.total_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self._layout)
        self._next, self._shard, self._handle = 0, -1, None

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard += 1
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self._shards[self._shard]:
            name, dtype, shape = self._layout[i]
            if dtype not in _DTYPE_NAMES:
                raise CheckpointError(f"cannot store '{name}' of dtype {dtype} in safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes it
        self._handle = BulkFile(self.dir / self._files[self._shard])
        self._handle.write(len(encoded).to_bytes(8, "little") + encoded)

    def add(self, name: str, tensor: torch.Tensor | Pieces,
            inspect: Callable[[Pieces], None] | None = None) -> None:
        """Append the next tensor of the layout: a tensor, or ``Pieces`` whose bytes are copied from where they lie
        (e.g. memory-mapped TP shards) into the file with no intermediate tensor.

        ``inspect`` (e.g. a finiteness check) sees each batch of about 1 MiB just before it is written, so the
        write copies bytes the check has just brought into the CPU cache (a separate pass over a memory-mapped
        checkpoint reads it from memory twice: measured 2.9 s of a 19 s export of 5 GB)."""
        if self._next >= len(self._layout):
            raise ValueError(f"'{name}' is not in the announced layout (all {len(self._layout)} tensors were written)")
        expected = self._layout[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"expected '{expected[0]}' {expected[1]} {expected[2]}, got '{name}' {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if self._shard < 0 or self._next not in self._shards[self._shard]:
            self._open_next_shard()
        pieces = tensor if isinstance(tensor, Pieces) else Pieces.of(tensor.detach().cpu())
        for batch in pieces.batches(_WRITE_BATCH_BYTES):
            if inspect is not None:
                inspect(batch)
            # Raw bytes in memory order (safetensors is little-endian, as every platform torch supports here).
            self._handle.write_all(batch.buffers())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._layout):
            raise ValueError(f"only {self._next} of {len(self._layout)} announced tensors were written")
        if self._handle is None:  # an empty model still gets its (empty) file
            self._open_next_shard()
        self._handle.close()
        if len(self._files) > 1:
            weight_map = {self._layout[i][0]: file for file, shard in zip(self._files, self._shards) for i in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def asset_files(src_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The non-weight files of a HF directory (config, generation config, tokenizer files; not its checksum
    manifest). Cheap: call it before work.

    Raises CheckpointError for a link that leads outside ``root`` (default: ``src_dir`` itself): never copy a file
    from elsewhere. A checkpoint's ``hf_assets/`` passes its iteration directory as ``root``, so ``hf_assets`` being
    itself a link to a folder outside the checkpoint (holding ``~/.ssh/id_rsa``, say) is refused too.
    """
    src = Path(src_dir)
    base = Path(root) if root is not None else src
    check_inside(src, base, f"{src}")  # the directory itself, when it is a link
    assets = []
    for path in sorted(src.iterdir()):
        # The checksum manifest describes its own directory: a copy of it elsewhere would be wrong at once.
        if (path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES)
                and path.name not in (SAFE_INDEX, BIN_INDEX, MANIFEST)):
            if not path.resolve().is_relative_to(src.resolve()):
                raise CheckpointError(f"{path} is a link to {path.resolve()}, outside {src}; copy the file in instead")
            assets.append(path)
    return assets


def copy_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                root: str | os.PathLike | None = None) -> list[str]:
    """Copy every non-weight file of a HF directory (see ``asset_files``, which checks ``root``) into ``dst_dir``."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in asset_files(src_dir, root):
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied
