"""BulkFile: the bytes written are the bytes given, past the page cache or not, whatever the sizes; torch.save into
one makes the bytes torch.save gives any file object; a filesystem or device that refuses O_DIRECT gets a plain file."""

from __future__ import annotations

import errno
import fcntl
import io
import os

import pytest
import torch

from megatron_patch.checkpoint import bulk_file, checksums
from megatron_patch.checkpoint.bulk_file import BulkFile

STAGE = 2 * 4096  # a small staging buffer, so that a few KiB cross it many times


def _pieces(sizes: list[int]) -> list[bytes]:
    generator = torch.Generator().manual_seed(sum(sizes))
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes() for n in sizes]


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "buffered"])
@pytest.mark.parametrize("sizes", [[1], [STAGE], [STAGE + 1], [3, 4093, 4096, 5 * STAGE + 7, 0, 12], [STAGE * 3]],
                         ids=["one-byte", "one-stage", "stage+1", "mixed", "whole-stages"])
def test_bytes_round_trip(tmp_path, monkeypatch, direct, sizes):
    monkeypatch.setenv("MEGATRON_PATCH_DIRECT_IO", direct)
    pieces = _pieces(sizes)
    path = tmp_path / "out.bin"
    with BulkFile(path, stage_bytes=STAGE) as out:
        if direct == "0":
            assert not out.direct
        for i, piece in enumerate(pieces):
            assert out.write(piece) == len(piece)
            assert out.tell() == sum(sizes[: i + 1])
    assert path.read_bytes() == b"".join(pieces)
    # the digest taken while writing is the file's (what the checksum manifest records without reading it again)
    assert checksums._streamed[str(path.absolute())][::2] == checksums.hash_file(path)


def test_gathered_writes(tmp_path):
    pieces = _pieces([100, STAGE, 3, 70000])
    with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
        out.write_all([memoryview(p) for p in pieces])
        assert out.tell() == sum(map(len, pieces))
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_torch_save_same_bytes_as_to_any_file_object(tmp_path):
    state = {"a": torch.randn(1000, 37), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(3).bfloat16()}
    plain = io.BytesIO()
    torch.save(state, plain)
    with BulkFile(tmp_path / "bulk.pt", stage_bytes=STAGE) as out:
        torch.save(state, out)
    assert (tmp_path / "bulk.pt").read_bytes() == plain.getvalue()
    loaded = torch.load(tmp_path / "bulk.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


def test_direct_where_the_filesystem_takes_it(tmp_path):
    """On Linux with a filesystem that takes O_DIRECT (the test machines' ext4) the file is written past the page
    cache; elsewhere this says so instead of passing silently."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as error:
        pytest.skip(f"{tmp_path} does not take O_DIRECT ({error})")
    with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
        assert out.direct
        assert fcntl.fcntl(out._fd, fcntl.F_GETFL) & os.O_DIRECT


def test_filesystem_without_o_direct(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(bulk_file.os, "open", refusing_open)
    pieces = _pieces([5, STAGE + 3])
    with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
        assert not out.direct
        out.write_all(pieces)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_device_refusing_the_alignment_goes_on_buffered(tmp_path, monkeypatch):
    """A device whose O_DIRECT alignment is larger than the buffer's answers EINVAL to the first write: the same
    bytes then go through the page cache from where they stopped."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write_all = bulk_file.write_all

    def picky_write_all(fd, buffers):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write_all(fd, buffers)

    monkeypatch.setattr(bulk_file, "write_all", picky_write_all)
    pieces = _pieces([STAGE * 2 + 11, 9])
    with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
        out.write_all(pieces)
        assert not out.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_other_errors_are_not_hidden(tmp_path):
    with pytest.raises(FileNotFoundError):
        BulkFile(tmp_path / "missing" / "out.bin")


def test_a_failed_write_in_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")

    def full_disk(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bulk_file, "write_all", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
            if not out.direct:
                pytest.skip(f"{tmp_path} does not take O_DIRECT")
            out.write(bytes(STAGE * 3))


def test_a_short_direct_write_is_not_written_twice(tmp_path, monkeypatch):
    """A direct write that stops part-way (the rest then refused as unaligned) goes on buffered from where the file
    ends, not from the start of the buffer."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write_all = bulk_file.write_all

    def short_then_refused(fd, buffers):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            os.write(fd, buffers[0][:4096])  # one block lands
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write_all(fd, buffers)

    monkeypatch.setattr(bulk_file, "write_all", short_then_refused)
    pieces = _pieces([STAGE * 2 + 5])
    with BulkFile(tmp_path / "out.bin", stage_bytes=STAGE) as out:
        if not out.direct:
            pytest.skip(f"{tmp_path} does not take O_DIRECT")
        out.write_all(pieces)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
