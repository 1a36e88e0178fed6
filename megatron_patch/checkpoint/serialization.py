"""``torch.save`` as the checkpoint writers use it."""

from __future__ import annotations

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
