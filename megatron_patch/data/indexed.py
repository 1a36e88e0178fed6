"""jsonl (one document per line) -> megatron-core mmap indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Documents are tokenized in chunks of whole lines by a pool of worker processes (``encode_worker.py``) and written in
input order, the tokenizer's EOD appended to each, in megatron-core's format (``IndexedDatasetWriter``).
Both files appear atomically (written under a temporary name, renamed when complete).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint.paths import check_output_path, check_outputs
from ..errors import BadLineError, ConfigError, DataError, WorkerDiedError
from ..runtime.progress import progress as progress_bar
from .encode_worker import EncodeSettings, encode_chunk, init_worker, parse_line, read_chunks
from .tokenizers import load_tokenizer

__all__ = ["BadLineError", "PreprocessSummary", "WorkerDiedError", "build_indexed_dataset", "parse_line"]

DEFAULT_CHUNK_BYTES = 1 << 20  # a work item: big enough to amortise the trip to a worker, small enough to keep all busy


@dataclass
class PreprocessSummary:
    output_prefix: str
    documents: int
    tokens: int
    skipped_lines: int
    empty_documents: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens, {self.tokens_per_second:,.0f} tokens/s "
                f"({self.seconds:.1f}s); skipped {self.skipped_lines} bad lines, {self.empty_documents} empty "
                f"documents -> {self.output_prefix}.bin/.idx")


def _ordered_results(pool: ProcessPoolExecutor, chunks, in_flight: int):
    """Results of ``encode_chunk`` in input order, with at most ``in_flight`` chunks submitted (bounded memory).

    Chunks are alike in bytes, so waiting for the oldest one costs the writer little: the others keep working.
    A worker that dies (kill -9, out of memory) breaks the pool: raise at once instead of waiting forever for a
    result that will never come (what ``multiprocessing.Pool`` does).
    """
    pending: deque = deque()
    chunks = iter(chunks)
    first_line = 1
    try:
        while True:
            while len(pending) < in_flight:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                try:
                    pending.append((chunk[0], pool.submit(encode_chunk, chunk)))
                except OSError as error:  # the pool spawns workers lazily; a break mid-spawn surfaces here
                    raise BrokenProcessPool(str(error)) from None
            if not pending:
                return
            first_line, future = pending.popleft()
            yield future.result()
    except BrokenProcessPool:  # raised by submit or result once a worker died
        raise WorkerDiedError(f"a tokenizer worker died (killed or out of memory?) while on the lines from "
                              f"{first_line}; nothing was written, run again (with fewer --workers if memory "
                              "is short)") from None


OUTPUT_SUFFIXES = (".bin", ".idx", ".tmp.bin", ".tmp.idx")  # the dataset and the temporary files it is built in


def check_output_prefix(input_path: str, output_prefix: str, prefix: str) -> None:
    """The output files ``<prefix>.bin/.idx`` (and their temporaries) name a file, and none of them is the input
    (``--output-prefix corpus --exact-prefix`` with ``--input corpus.bin`` would tokenize into the file being read)."""
    check_output_path(output_prefix, "--output-prefix")
    if Path(prefix).name in ("", ".", ".."):
        raise ConfigError(f"--output-prefix {output_prefix!r} names a directory; add a file name prefix "
                          "(e.g. out/corpus)")
    for suffix in OUTPUT_SUFFIXES:
        check_outputs({"--output-prefix": prefix + suffix}, {"--input": input_path})


def token_dtype(vocab_size: int):
    # uint16 halves the .bin when every id fits, as Megatron-LM does.
    return np.uint16 if vocab_size < 65500 else np.int32


# megatron-core's mmap index (MMIDIDX): header, version 1, the token dtype's code, then counts and arrays.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                np.uint16: 8}


class IndexedDatasetWriter:
    """Writes megatron-core's indexed dataset (``.bin`` + ``.idx``, one sequence per document) a chunk at a time.

    The bytes equal those of ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` fed one document at a
    time (tested), without importing megatron-core (5-12 s here, for a tool that only tokenizes) and holding 4 bytes
    per document in memory instead of a Python int.
    """

    def __init__(self, bin_path: Path, dtype):
        self.dtype = dtype
        self.data_file = open(bin_path, "wb")
        self._lengths = np.empty(1 << 16, dtype=np.int32)
        self.documents = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and the length of each."""
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        end = self.documents + len(lengths)
        if end > len(self._lengths):
            self._lengths = np.resize(self._lengths, max(end, 2 * len(self._lengths)))
        self._lengths[self.documents:end] = lengths
        self.documents = end

    def close(self) -> None:
        self.data_file.close()

    def finalize(self, idx_path: Path) -> None:
        self.close()
        lengths = self._lengths[:self.documents]
        pointers = np.zeros(self.documents, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(self.dtype).itemsize
        with open(idx_path, "wb") as index:
            index.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            index.write(struct.pack("<Q", self.documents) + struct.pack("<Q", self.documents + 1))
            index.write(lengths.tobytes())
            index.write(pointers.tobytes())
            index.write(np.arange(self.documents + 1, dtype=np.int64).tobytes())  # document i = sequence i


def build_indexed_dataset(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    tokenizer_kind: str | None = None,
    json_key: str = "text",
    workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    skip_bad_lines: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
) -> PreprocessSummary:
    """Tokenize ``input_path`` into ``<output_prefix>.bin/.idx`` with ``workers`` processes (1: in this process).

    The parent reads chunks of whole lines by bytes and writes the workers' token arrays in input order straight into
    the ``.bin``. Memory holds at most ``3 x workers`` chunks in flight plus 4 bytes per document for the index.
    """
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input {input_path} does not exist")
    size = input_path.stat().st_size
    if size == 0:
        raise DataError(f"input {input_path} is empty: nothing to tokenize")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if chunk_bytes < 1:
        raise ConfigError(f"--chunk-mb must be positive (got {chunk_bytes} bytes)")
    tokenizer = load_tokenizer(tokenizer_path, tokenizer_kind)  # fail here, not in a worker
    # The key must exist on the first document: a wrong --json-key is a usage error, not a bad line.
    with open(input_path, encoding="utf-8", errors="replace") as handle:
        first = next(((i, ln) for i, ln in enumerate(handle, 1) if ln.strip()), None)
    if first is None:
        raise DataError(f"input {input_path} has no documents (only blank lines)")
    try:
        record = json.loads(first[1])
        if isinstance(record, dict) and json_key not in record:
            raise ConfigError(f"--json-key '{json_key}' is not in the documents of {input_path} "
                             f"(line {first[0]} has keys: {', '.join(sorted(record)) or 'none'})")
    except json.JSONDecodeError:
        pass  # reported with its line number below (or skipped)

    prefix = Path(output_prefix)
    outputs = [prefix.with_name(prefix.name + suffix) for suffix in (".bin", ".idx")]
    if not overwrite and any(path.exists() for path in outputs):
        raise FileExistsError(f"an indexed dataset {prefix}.bin/.idx exists already (pass --overwrite to replace it)")
    if prefix.parent.exists() and not prefix.parent.is_dir():
        raise NotADirectoryError(f"cannot write {prefix}.bin: {prefix.parent} is a file, not a directory")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = prefix.with_name(prefix.name + ".tmp.bin")
    tmp_idx = prefix.with_name(prefix.name + ".tmp.idx")
    dtype = token_dtype(tokenizer.vocab_size)
    settings = EncodeSettings(tokenizer.worker_encoder(), json_key, tokenizer.eod, dtype)
    writer = IndexedDatasetWriter(tmp_bin, dtype)
    documents = tokens = skipped = empty = 0
    start = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), init_worker, (settings,)) if workers > 1 else None
    chunks = read_chunks(input_path, chunk_bytes)
    finished = False
    try:
        if pool is None:
            init_worker(settings)
            results = map(encode_chunk, chunks)
        else:
            results = _ordered_results(pool, chunks, in_flight=3 * workers)
        with progress_bar(total=round(size / 1e6, 1), desc="tokenizing", unit="MB",
                          enabled=progress is not False) as bar:
            for chunk in results:
                if chunk.bad_lines:
                    if not skip_bad_lines:
                        raise BadLineError(f"{input_path}: {chunk.bad_lines[0]} (pass --skip-bad-lines to skip "
                                           "such lines)")
                    skipped += len(chunk.bad_lines)
                writer.add_documents(chunk.tokens, chunk.lengths)
                documents += len(chunk.lengths)
                tokens += len(chunk.tokens)
                empty += chunk.empty
                bar.update(round(chunk.nbytes / 1e6, 3))
                bar.set_postfix(tokens=tokens, refresh=False)
        if documents == 0:
            raise DataError(f"no documents in {input_path} could be tokenized ({skipped} bad lines, {empty} empty)")
        writer.finalize(tmp_idx)
        finished = True
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if not finished:  # an error or an interrupt: leave no half-written dataset behind
            writer.close()
            for path in (tmp_bin, tmp_idx):
                path.unlink(missing_ok=True)
    # As a pair: without the old index a reader finds no dataset, never a new .bin under an old .idx.
    outputs[1].unlink(missing_ok=True)
    os.replace(tmp_bin, outputs[0])
    os.replace(tmp_idx, outputs[1])
    return PreprocessSummary(str(prefix), documents, tokens, skipped, empty, time.perf_counter() - start)
