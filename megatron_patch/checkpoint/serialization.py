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
