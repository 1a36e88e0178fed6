"""Where the raw bytes of a DCP tensor record lie, so a reader can copy them straight into its destination.

DCP's ``FileSystemWriter`` (and ``torch_dist_io.write_torch_dist``) stores each tensor chunk as one ``torch.save``
record: an uncompressed zip archive of ``<prefix>/data.pkl`` (the pickled tensor: storage reference, offset,
shape, strides), ``<prefix>/byteorder`` and ``<prefix>/data/<key>`` (the storage's raw bytes). DCP's reader
``torch.load``s each record into a new tensor and copies it again into the destination; for a plain record the
data bytes can instead be read once, into the destination's own memory.

``tensor_record_data`` locates those bytes through the record's zip central directory and checks the pickled
tensor with an unpickler that knows only the few names a plain tensor pickle uses (no code runs). Anything
unexpected (compression, an unknown storage type, a strided or offset view, another dtype or shape, zip64 quirks
``zipfile`` rejects) returns None, and the caller reads that record the ordinary way.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import torch

# The legacy storage classes torch.save pickles a tensor's storage as, by dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
# What a failed probe raises: a malformed or foreign record, never a reason to stop (the caller falls back).
PROBE_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError, struct.error,
                zipfile.BadZipFile, pickle.UnpicklingError)


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_ref(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if rest and rest != (None,) and not (len(rest) == 1 and rest[0] == {}):
        raise pickle.UnpicklingError("tensor metadata in the record")
    if backward_hooks:
        raise pickle.UnpicklingError("backward hooks in the record")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _TensorRecordUnpickler(pickle.Unpickler):
    """Unpickles a plain tensor's ``data.pkl`` into a ``_TensorRef``; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_ref
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("unexpected persistent id")
        return _StorageRef(dtype, str(key), int(numel))


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of their own (for ``zipfile``)."""

    def __init__(self, file: BinaryIO, offset: int, length: int):
        self.file, self.offset, self.length, self.position = file, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, position, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = min(max(base + position, 0), self.length)
        return self.position

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")[: max(self.length - self.position, 0)]
        self.file.seek(self.offset + self.position)
        count = self.file.readinto(view) or 0
        self.position += count
        return count


def _member_start(record: _FileSlice, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes within the record (its local header's own name/extra lengths decide)."""
    record.seek(info.header_offset)
    header = record.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE or info.compress_type != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile("not a stored member")
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _member_bytes(record: _FileSlice, info: zipfile.ZipInfo) -> bytes:
    record.seek(_member_start(record, info))
    data = record.read(info.file_size)
    if len(data) != info.file_size:
        raise EOFError("record member cut short")
    return data


def tensor_record_data(file: BinaryIO, offset: int, length: int, dtype: torch.dtype,
                       sizes: tuple[int, ...]) -> int | None:
    """Absolute file offset of the row-major bytes of the ``dtype`` tensor of shape ``sizes`` stored as the
    ``torch.save`` record at ``[offset, offset + length)`` of ``file``; None when the record is anything else.

    Raises:
        One of ``PROBE_ERRORS`` for a malformed record (the caller treats it like None).
    """
    record = _FileSlice(file, offset, length)
    with zipfile.ZipFile(record) as archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = members.get(prefix + "byteorder")
        order = _member_bytes(record, byteorder).decode() if byteorder is not None else sys.byteorder
        if order != sys.byteorder:
            return None
        tensor = _TensorRecordUnpickler(io.BytesIO(_member_bytes(record, members[pickles[0]]))).load()
        if not isinstance(tensor, _TensorRef) or tensor.storage.dtype != dtype or tensor.size != tuple(sizes):
            return None
        contiguous = tuple(math.prod(sizes[dim + 1:]) for dim in range(len(sizes)))
        if any(size > 1 and stride != want for size, stride, want in zip(sizes, tensor.stride, contiguous)):
            return None
        itemsize = dtype.itemsize
        data = members.get(f"{prefix}data/{tensor.storage.key}")
        if data is None or data.file_size != tensor.storage.numel * itemsize:
            return None
        if tensor.storage_offset + math.prod(sizes) > tensor.storage.numel:
            return None
        return offset + _member_start(record, data) + tensor.storage_offset * itemsize
