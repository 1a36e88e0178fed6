"""Writing and reading the files of a torch_dist checkpoint (see ``torch_dist`` for what they hold), in one
process, one parameter at a time, without megatron-core."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import pickle
import re
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import CheckpointError
from ..mapping import Entry, Sharding
from ..mapping.checks import check_exact_names
from ..mapping.rows import GatedMLP
from .bulk_file import BulkFile
from .dcp_records import PROBE_ERRORS, tensor_record_data
from .serialization import own_storage, prefault, without_crc32
from .torch_dist import (
    BACKEND_CONFIG,
    COMMON_FILE,
    CONFIG_FILE,
    DCP_METADATA,
    EXTRA_STATE_MARK,
    extra_state_keys,
    layout,
    sharded_key,
)
from .trusted_load import read_dcp_metadata as read_trusted_metadata


@contextmanager
def _one_process():
    """DCP's save/load in this process alone (``no_dist``): silence the warning DCP gives for exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# --- writing --------------------------------------------------------------------------------------------------


_PER_LAYER_KEY = re.compile(r"decoder\.layers\.\d+\.")  # a key of one layer (not stacked over layers)
DCP_DATA_FILE = "__0_0.distcp"  # what DCP's FileSystemWriter names rank 0's single file
# torch.save aligns a record's tensor bytes to 64 within the record; records starting at multiples of 64 put every
# tensor at an aligned file offset, so a reader can map it instead of copying it (``TorchDistReader._mapped``).
RECORD_ALIGNMENT = 64


def _entry_parts(single: Sharding, entry: Entry, hf_tensors: list[torch.Tensor], parts: int) -> list[torch.Tensor]:
    """The ``parts`` stored chunks (dim-0 pieces) of an entry's full megatron tensor.

    SwiGLU ``linear_fc1`` = [gate; up] is stored as two chunks that are exactly the HF gate and up tensors: they are
    written from the HF files as they are instead of being concatenated and split again (fc1 is about half of a
    llama layer's bytes); each is checked as the full tensor would have been."""
    if parts == 2 and isinstance(entry.row, GatedMLP):
        return [single.checked(entry, tensor) for tensor in hf_tensors]
    return list(single.full_megatron_tensor(entry, hf_tensors).chunk(parts, dim=0))


def write_torch_dist(sharding: Sharding, reader, iter_dir: Path, dtype: torch.dtype, progress=None) -> None:
    """Write ``sharding``'s model from the HF ``reader`` as a torch_dist checkpoint into ``iter_dir``.

    The tensors are exactly those of a TP=1 PP=1 save (any TP x PP loads them); every chunk is cast to ``dtype``,
    as a model built with ``params_dtype=dtype`` would hold it.

    The files are what ``dcp.save`` with a single-file ``FileSystemWriter`` writes (one ``__0_0.distcp`` of
    ``torch.save`` records: the byte objects first, then the tensor chunks in plan order; a pickled DCP
    ``Metadata`` of the same classes), written here directly: one entry's tensors at a time, each straight from
    the memory-mapped HF files, to a ``BulkFile`` (past the page cache where the filesystem allows it).
    """
    single = sharding.retarget(1, 1, 1)
    chunks = layout(sharding)
    state_dict_metadata, storage_data = {}, {}
    properties = TensorProperties(dtype=dtype)

    with BulkFile(iter_dir / DCP_DATA_FILE) as out, without_crc32():
        def record(index: MetadataIndex, item: torch.Tensor | memoryview) -> None:
            """Append one item (a tensor as a ``torch.save`` record, an object's bytes as they are) at a multiple of
            ``RECORD_ALIGNMENT`` bytes (readers find records by offset and length, so the gap is never read)."""
            out.write(bytes(-out.tell() % RECORD_ALIGNMENT))
            offset = out.tell()
            torch.save(item, out) if isinstance(item, torch.Tensor) else out.write(item)
            storage_data[index] = _StorageInfo(DCP_DATA_FILE, offset, out.tell() - offset)

        extra_state = io.BytesIO()
        torch.save([None], extra_state)  # megatron-core packs the objects of one key in a list
        for key in extra_state_keys(sharding):
            state_dict_metadata[key] = BytesStorageMetadata()
            record(MetadataIndex(key), extra_state.getbuffer())

        current, parts = None, []
        for chunk in chunks:
            if chunk.entry != current:
                current, parts = None, []  # drop the previous entry's tensors before building the next
                hf_tensors = [reader.get(name) for name in chunk.entry.hf_names]
                parts = [part.to(dtype) for part in _entry_parts(single, chunk.entry, hf_tensors, chunk.parts)]
                current = chunk.entry
                if progress is not None:
                    progress.update(1)
            stored = state_dict_metadata.setdefault(
                chunk.key, TensorStorageMetadata(properties=properties, size=chunk.global_shape, chunks=[]))
            index = MetadataIndex(chunk.key, chunk.offsets, len(stored.chunks))
            stored.chunks.append(ChunkStorageMetadata(offsets=chunk.offsets, sizes=chunk.sizes))
            record(index, own_storage(parts[chunk.part].reshape(chunk.sizes)))
        del current, parts

    metadata = Metadata(state_dict_metadata=state_dict_metadata, planner_data=None, storage_data=storage_data,
                        storage_meta=StorageMeta(checkpoint_id=iter_dir, save_id=str(uuid.uuid4())),
                        version=CURRENT_DCP_VERSION)
    with open(iter_dir / DCP_METADATA, "wb") as handle:
        pickle.dump(metadata, handle)
    (iter_dir / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))
    torch.save({}, iter_dir / COMMON_FILE)


# --- reading --------------------------------------------------------------------------------------------------


class _RegionLoadPlanner(LoadPlanner):
    """Reads one box (``offsets``, ``dest.shape``) of one key into ``dest``, from whatever chunks hold it."""

    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor):
        self.key, self.offsets, self.dest = key, torch.Size(offsets), dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        wanted = ChunkStorageMetadata(offsets=self.offsets, sizes=self.dest.shape)
        items = create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [wanted])
        if sum(math.prod(item.lengths) for item in items) != self.dest.numel():
            raise CheckpointError(f"the stored chunks of '{self.key}' do not cover offsets {tuple(self.offsets)} "
                                  f"size {tuple(self.dest.shape)}")
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"{self.key}: only tensors are read")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of ``dest``: the data is already in place


class _MetadataOnceReader(FileSystemReader):
    """A ``FileSystemReader`` that unpickles ``.metadata`` once, not once per read."""

    def __init__(self, path: os.PathLike, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        return self._metadata


def read_dcp_metadata(iter_dir: Path):
    """The checkpoint's DCP metadata (the only place this module reads ``.metadata``), unpickled with the allow-list
    of ``checkpoint.trusted_load``: a crafted file is refused instead of run. Only tensors are read after it, and
    torch reads those with ``weights_only=True``."""
    return read_trusted_metadata(Path(iter_dir) / DCP_METADATA)


class TorchDistReader:
    """Full (TP=1) megatron tensors from a torch_dist checkpoint of any saved TP x PP, one parameter at a time."""

    def __init__(self, iter_dir: str | os.PathLike):
        self.dir = Path(iter_dir)
        for name in (CONFIG_FILE, DCP_METADATA):
            if not (self.dir / name).is_file():
                raise CheckpointError(f"torch_dist checkpoint {self.dir} has no {name}")
        try:
            self.metadata = read_dcp_metadata(self.dir)
        except CheckpointError:
            raise
        except Exception as error:  # pickle and torch raise several types for a damaged file
            raise CheckpointError(f"cannot read {self.dir / DCP_METADATA} (truncated or corrupt?): "
                                  f"{' '.join(str(error).split())}") from None
        self._reader = _MetadataOnceReader(self.dir, self.metadata)
        self._record_data: dict[tuple[str, int], int | None] = {}  # (file, record offset) -> data offset or None

    def check_matches(self, saved: Sharding, backbone_only: bool = False) -> None:
        """The stored tensors are exactly those of ``saved``'s model, with its global shapes (``_extra_state``
        aside): a ``megatron_patch.json`` that disagrees with the weights is refused instead of exported.

        ``backbone_only``: compare the shapes of the tensors both have, the output layer aside (a reward model or
        critic stores its own head there): a cheap check, before a model of the recorded sizes is built, that the
        recorded sizes are the stored ones."""
        expected = {chunk.key: tuple(chunk.global_shape) for chunk in layout(saved)}
        stored = {key: tuple(item.size) for key, item in self.metadata.state_dict_metadata.items()
                  if isinstance(item, TensorStorageMetadata)}
        if backbone_only:
            expected = {key: shape for key, shape in expected.items()
                        if key in stored and not key.startswith("output_layer.")}
            stored = {key: shape for key, shape in stored.items() if key in expected}
        check_exact_names(stored, expected, f"torch_dist checkpoint {self.dir}")
        objects = sorted(key for key, item in self.metadata.state_dict_metadata.items()
                         if isinstance(item, BytesStorageMetadata) and EXTRA_STATE_MARK not in key)
        if objects and not backbone_only:  # a model checkpoint holds objects only as the layers' _extra_state
            raise CheckpointError(f"torch_dist checkpoint {self.dir} holds object item '{objects[0]}', which a "
                                  "model checkpoint never does (only '..._extra_state' objects)")
        for key, shape in expected.items():
            if stored[key] != shape:
                raise CheckpointError(f"torch_dist checkpoint {self.dir}: '{key}' has shape {stored[key]}; its "
                                      f"recorded configuration implies {shape}")

    @functools.cached_property
    def _stacked(self) -> bool:
        """Whether the decoder layers are stacked under one key per parameter (see ``torch_dist.stacks_layers``)."""
        return not any(_PER_LAYER_KEY.match(key) for key in self.metadata.state_dict_metadata)

    def _where(self, global_name: str) -> tuple[str, tuple[int, ...], TensorStorageMetadata]:
        key, index = sharded_key(global_name, self._stacked)
        stored = self.metadata.state_dict_metadata.get(key)
        if not isinstance(stored, TensorStorageMetadata):
            raise CheckpointError(f"torch_dist checkpoint {self.dir} holds no tensor '{key}' (for {global_name})")
        if len(stored.size) < len(index) or any(i >= n for i, n in zip(index, stored.size)):
            raise CheckpointError(f"torch_dist checkpoint {self.dir}: '{key}' of shape {tuple(stored.size)} has no "
                                  f"entry {index} (layer, expert)")
        return key, index, stored

    def meta(self, global_name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype ``full`` returns (nothing is read)."""
        _, index, stored = self._where(global_name)
        return torch.empty(stored.size[len(index):], dtype=stored.properties.dtype, device="meta")

    def shards(self, global_name: str) -> list[torch.Tensor]:
        """``[full(global_name)]``: a torch_dist checkpoint stores global tensors."""
        return [self.full(global_name)]

    def full(self, global_name: str) -> torch.Tensor:
        key, index, stored = self._where(global_name)
        lead = len(index)
        dest = torch.empty((*(1,) * lead, *stored.size[lead:]), dtype=stored.properties.dtype)
        offsets = (*index, *(0,) * (len(stored.size) - lead))

        def strip(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(stored.size[lead:]) if lead else tensor

        mapped = self._mapped(key, stored, offsets, dest.shape)
        if mapped is not None:
            return strip(mapped)
        if self._read_records(key, stored, offsets, dest):
            return strip(dest)
        try:
            with _one_process():
                dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(key, offsets, dest), no_dist=True)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as error:  # a missing or truncated .distcp file surfaces as several
            # exception types; DCP wraps them in CheckpointException, a BaseException
            raise CheckpointError(f"cannot read '{key}' from torch_dist checkpoint {self.dir} (missing or truncated "
                                  f"file?): {' '.join(str(error).split())[:300]}") from None
        return strip(dest)

    def _mapped(self, key: str, stored: TensorStorageMetadata, offsets: tuple[int, ...],
                sizes: torch.Size) -> torch.Tensor | None:
        """The box (``offsets``, ``sizes``) of ``key`` as a view of a private memory map of its file, when one plain
        record holds all of it contiguously at an offset aligned for its dtype (every tensor of a checkpoint this
        toolkit wrote); None otherwise. Nothing is copied: pages are read as the caller touches them, and the
        mapping goes with the tensor (as ``safetensors`` reads the HF files).

        Raises:
            CheckpointError: the file ends before the record's bytes do.
        """
        items = create_read_items_for_chunk_list(key, stored, [ChunkStorageMetadata(torch.Size(offsets), sizes)])
        if len(items) != 1 or math.prod(items[0].lengths) != math.prod(sizes):
            return None
        dtype = stored.properties.dtype
        found = self._plain_bytes(items[0], stored)
        if found is None or found[1] % dtype.itemsize:
            return None
        path = self.dir / found[0]
        position, file_bytes = found[1], path.stat().st_size
        if position + math.prod(sizes) * dtype.itemsize > file_bytes:
            raise CheckpointError(f"cannot read '{key}' from torch_dist checkpoint {self.dir} (missing or truncated "
                                  f"file?): {path.name} ends before its data")
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=file_bytes)
        return prefault(torch.empty(0, dtype=dtype).set_(storage, position // dtype.itemsize, sizes))

    def _read_records(self, key: str, stored: TensorStorageMetadata, offsets: tuple[int, ...],
                      dest: torch.Tensor) -> bool:
        """Read the box (``offsets``, ``dest.shape``) of ``key`` into ``dest`` by copying each stored record's raw
        bytes straight into it (one read per chunk, no intermediate tensor); False, with nothing promised about
        ``dest``, when some record is not a plain tensor record (the caller then reads through DCP).

        Raises:
            CheckpointError: the chunks do not cover the box, or a record's bytes end early.
        """
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
        items = create_read_items_for_chunk_list(key, stored, [wanted])
        if sum(math.prod(item.lengths) for item in items) != dest.numel():
            raise CheckpointError(f"the stored chunks of '{key}' do not cover offsets {tuple(offsets)} "
                                  f"size {tuple(dest.shape)}")
        dtype = stored.properties.dtype
        reads = []  # (file, absolute offset, byte count, destination view)
        for item in items:
            found = self._plain_bytes(item, stored)
            if found is None:
                return False
            view = dest
            for dim, (begin, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                view = view.narrow(dim, begin, length)
            reads.append((*found, view.numel() * dtype.itemsize, view))
        for relative_path in sorted({read[0] for read in reads}):
            with open(self.dir / relative_path, "rb", buffering=0) as file:
                for _, position, nbytes, view in sorted((r for r in reads if r[0] == relative_path),
                                                        key=lambda r: r[1]):
                    target = view if view.is_contiguous() else torch.empty(view.shape, dtype=dtype)
                    _read_exactly(file, position, target, nbytes,
                                  f"'{key}' from torch_dist checkpoint {self.dir} (missing or truncated file?)")
                    if target is not view:
                        view.copy_(target)
        return True

    def _plain_bytes(self, item, stored: TensorStorageMetadata) -> tuple[str, int] | None:
        """(file, byte position) of a read item's elements when its record is a plain tensor record holding them
        contiguously; None otherwise (a record DCP must read)."""
        dtype = stored.properties.dtype
        info = self.metadata.storage_data.get(item.storage_index)
        sizes = tuple(stored.chunks[item.storage_index.index].sizes)
        source = _contiguous_range(sizes, tuple(item.storage_offsets), tuple(item.lengths))
        if info is None or getattr(info, "transform_descriptors", None) or source is None:
            return None
        start = self._data_offset(info, dtype, sizes)
        return None if start is None else (info.relative_path, start + source * dtype.itemsize)

    def _data_offset(self, info: _StorageInfo, dtype: torch.dtype, sizes: tuple[int, ...]) -> int | None:
        """Where the raw bytes of the record ``info`` start, if it is a plain ``dtype`` tensor of ``sizes``."""
        cache_key = (info.relative_path, info.offset)
        if cache_key not in self._record_data:
            try:
                with open(self.dir / info.relative_path, "rb", buffering=0) as file:
                    start = tensor_record_data(file, info.offset, info.length, dtype, sizes)
            except PROBE_ERRORS:
                start = None  # a missing, cut or foreign record: DCP reads it and reports what is wrong
            self._record_data[cache_key] = start
        return self._record_data[cache_key]


def _contiguous_range(sizes: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]) -> int | None:
    """Element offset of the box (``offsets``, ``lengths``) in a row-major tensor of ``sizes`` if the box is one
    contiguous run of elements (dims before the first partial one have length 1), else None."""
    partial = [dim for dim, (size, length) in enumerate(zip(sizes, lengths)) if length != size]
    if partial and any(length != 1 for length in lengths[:partial[-1]]):
        return None
    return sum(offset * math.prod(sizes[dim + 1:]) for dim, offset in enumerate(offsets))


def _read_exactly(file, position: int, target: torch.Tensor, nbytes: int, what: str) -> None:
    """Fill the contiguous ``target`` with the ``nbytes`` bytes at ``position`` of the unbuffered ``file``."""
    buffer = memoryview(target.reshape(-1).view(torch.uint8).numpy()).cast("B")
    file.seek(position)
    done = 0
    while done < nbytes:
        count = file.readinto(buffer[done:])
        if not count:
            raise CheckpointError(f"cannot read {what}: the file ends {nbytes - done} bytes early")
        done += count
