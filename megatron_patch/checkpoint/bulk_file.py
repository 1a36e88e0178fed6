"""Files of gigabytes written once, front to back (the converters' outputs): with ``O_DIRECT`` where it is taken.

A buffered ``write`` copies every byte into the page cache, and the kernel must find a free page for each 4 KiB
first; on the machines this was measured on (virtual machines whose free memory goes back to the host) that, not the
disk, sets the speed: ``dd`` of 2 GiB took 6.8 s buffered (``conv=fsync``) and 1.1 s with ``O_DIRECT`` (same disk),
and a 5 GiB ``torch.save`` 9-10 s against 3.6-4.1 s through this file. ``O_DIRECT`` needs block-aligned memory,
lengths and offsets, so bytes are staged in page-aligned buffers and written a whole buffer at a time; the unaligned
tail is written after ``O_DIRECT`` is switched off. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some FUSE
mounts), off Linux, or with ``MEGATRON_PATCH_DIRECT_IO=0``, writes go straight to an ordinary file descriptor.
Checkpoint files are read later by other processes, so skipping the page cache costs nothing they would reuse.

Every byte is hashed as it is written (``checksums``: XXH3-64 per 64 MiB chunk, for the checkpoint's manifest): with
``O_DIRECT`` by the writer thread, on the staging buffer it is about to write, so the hash overlaps the caller filling
the other one.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from . import checksums
from .serialization import write_all

STAGE_BYTES = 64 << 20  # a multiple of any block size O_DIRECT asks for (512 B - 4 KiB)


def direct_io_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("MEGATRON_PATCH_DIRECT_IO", "1") != "0"


def _as_bytes(data) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class BulkFile:
    """A new file (truncated if it exists) written sequentially; a file object for ``torch.save`` and our
    writers (``write``, ``write_all``, ``tell``, ``flush``, ``close``, a context manager).

    With ``O_DIRECT`` there are two staging buffers: while one thread writes a full one to the disk (the system
    call releases the GIL), the caller goes on reading and copying its next bytes into the other.

    Args:
        path: the file to create.
        stage_bytes: the size of each staging buffer (a multiple of 4 KiB).
    """

    def __init__(self, path: str | os.PathLike, stage_bytes: int = STAGE_BYTES):
        self._path, self._digest = path, checksums.ChunkedDigest()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd, self._position, self._direct = -1, 0, False
        self._stages: list[memoryview] = []
        self._fill, self._writer, self._pending = 0, None, None
        if direct_io_wanted():
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as error:
                if error.errno != errno.EINVAL:  # EINVAL: this filesystem does not do O_DIRECT
                    raise
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o666)
        else:
            self._direct = True
            self._stages = [memoryview(mmap.mmap(-1, stage_bytes)) for _ in range(2)]  # anonymous maps: page-aligned
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-file")

    @property
    def direct(self) -> bool:
        """Whether bytes go to the disk past the page cache."""
        return self._direct

    def write(self, data) -> int:
        view = _as_bytes(data)
        if not self._stages:
            self._digest.update(view)
            write_all(self._fd, [view])
        else:
            taken = 0
            while taken < view.nbytes:
                stage = self._stages[0]
                count = min(view.nbytes - taken, len(stage) - self._fill)
                stage[self._fill:self._fill + count] = view[taken:taken + count]
                self._fill += count
                taken += count
                if self._fill == len(stage):
                    self._hand_over()
        self._position += view.nbytes
        return view.nbytes

    def write_all(self, buffers) -> None:
        """Write ``buffers`` one after another (gathered into one system call per 1024 without ``O_DIRECT``)."""
        if not self._stages:
            buffers = [_as_bytes(b) for b in buffers]
            for buffer in buffers:
                self._digest.update(buffer)
            write_all(self._fd, buffers)
            self._position += sum(b.nbytes for b in buffers)
        else:
            for buffer in buffers:
                self.write(buffer)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing to do: staged bytes are written when a buffer is full and at ``close``."""

    def _hand_over(self) -> None:
        """Give the full staging buffer to the writer thread and continue in the other one once it is free."""
        self._wait()
        self._pending = self._writer.submit(self._write_stage, self._stages[0])
        self._stages.reverse()
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a write error surfaces here, in the caller's thread

    def _write_stage(self, stage: memoryview) -> None:
        self._digest.update(stage)
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        try:
            write_all(self._fd, [stage])
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            # The device wants a larger alignment than the buffer's, or a short write left the offset unaligned:
            # go on buffered from where the file ends (Linux lets fcntl clear O_DIRECT on an open file).
            self._buffered()
            write_all(self._fd, [stage[os.lseek(self._fd, 0, os.SEEK_CUR) - start:]])

    def _buffered(self) -> None:
        import fcntl  # POSIX only, and only reached where O_DIRECT exists (Linux)

        self._direct = False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def close(self) -> None:
        """Write what is staged and close; raises the first write error."""
        self._close(flush=True)

    def _close(self, flush: bool) -> None:
        if self._fd < 0:
            return
        done = False
        try:
            if self._stages and flush:
                self._wait()
                if self._fill:
                    self._buffered()  # the tail is not a whole number of blocks
                    self._digest.update(self._stages[0][:self._fill])
                    write_all(self._fd, [self._stages[0][:self._fill]])
            done = flush
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)  # after an error the pending write may still run: let it end
            os.close(self._fd)
            self._fd = -1
            for stage in self._stages:
                mapped = stage.obj
                stage.release()
                try:
                    mapped.close()
                except BufferError:  # a view of it lives on in a traceback: unmapped when that goes
                    pass
            self._stages = []
        if done:  # the whole file went through the digest: the manifest takes it from here
            checksums.remember(self._path, self._position, self._digest.hexdigests())

    def __enter__(self) -> BulkFile:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # After an error the file is incomplete anyway (and is removed with its output directory): close it
        # without writing more, so the first error is the one reported.
        self._close(flush=exc_type is None)
