"""``torch.save`` as the checkpoint writers use it."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from contextlib import contextmanager

import torch


@contextmanager
def without_crc32():
    """``torch.save`` without the CRC32 of each record: ``torch.load`` (and so DCP, megatron-core and Megatron-LM)
    never checks it, and computing it is a third of the user time of a conversion."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (made contiguous) over a storage of exactly its bytes, without copying a contiguous one.

    ``torch.save`` writes a view's whole storage (for a view of a memory-mapped file: the whole file), which is why
    DCP clones every view; a buffer view of the same memory lets ``torch.save`` write the bytes straight from where
    they are."""
    tensor = tensor.contiguous()
    if tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    data = torch.frombuffer(tensor.reshape(-1).view(torch.uint8).numpy(), dtype=torch.uint8)
    return data.view(tensor.dtype).view(tensor.shape)


_MADV_POPULATE_READ = 22  # Linux >= 5.14
_PAGE = 4096


@functools.cache
def _madvise():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def prefault(tensor: torch.Tensor) -> torch.Tensor:
    """Map the pages of a memory-mapped tensor in one call before it is read, returns it.

    Read through a memory map, a tensor costs one page fault per 4 KiB when first touched, and a ``write`` from such
    memory takes the kernel's slow fault-in-and-retry path for every page; ``MADV_POPULATE_READ`` maps them all at
    once (measured on the conversion benchmark's machine: 1.0-1.4 -> 1.6-1.7 GB/s writing 4.3 GB from mapped
    safetensors files). A no-op where the kernel lacks it (EINVAL) and off Linux."""
    madvise = _madvise()
    if madvise is None or tensor.numel() == 0:
        return tensor
    start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    end = start + tensor.numel() * tensor.element_size()
    aligned = start - start % _PAGE
    madvise(aligned, end - aligned, _MADV_POPULATE_READ)
    return tensor


_IOV_MAX = 1024  # POSIX's minimum, Linux's value: the most buffers one writev takes


def write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write ``buffers`` one after another to ``fd``, gathering up to 1024 per system call.

    A tensor exported from a row-split TP merge is thousands of row pieces lying in different shards; one ``write``
    each costs a system call per few KiB, ``writev`` one per 1024 pieces. Short writes (a full disk, a signal) are
    resumed where they stopped."""
    buffers = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if b.nbytes]
    while buffers:
        batch = buffers[:_IOV_MAX]
        written = os.writev(fd, batch) if hasattr(os, "writev") else os.write(fd, batch[0])
        done = 0
        while done < len(batch) and written >= batch[done].nbytes:
            written -= batch[done].nbytes
            done += 1
        buffers = buffers[done:]
        if written:
            buffers[0] = buffers[0][written:]
