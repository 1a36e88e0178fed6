"""prefault maps a memory-mapped tensor's pages in one call (MADV_POPULATE_READ) and changes nothing else."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_patch.checkpoint.serialization import prefault


def _rss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Rss:"))


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_READ is Linux's")
def test_prefault_maps_the_pages_of_a_mapped_tensor(tmp_path):
    path = tmp_path / "data.bin"
    values = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    path.write_bytes(values.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    mapped = torch.empty(0, dtype=torch.float32).set_(storage, 1024, (values.numel() - 1024,))
    before = _rss_bytes()
    assert prefault(mapped) is mapped
    grown = _rss_bytes() - before
    if grown == 0:
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux < 5.14): prefault is a no-op")
    assert grown >= 0.9 * mapped.numel() * 4  # the pages are mapped now, without touching the tensor
    assert torch.equal(mapped, values[1024:])


def test_prefault_of_ordinary_memory_is_harmless():
    tensor = torch.arange(10.0)[3:]
    assert prefault(tensor) is tensor and tensor.sum() == 42
    assert prefault(torch.empty(0)).numel() == 0
