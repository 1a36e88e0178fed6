"""jsonl (one document per line) -> megatron-core mmap indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Documents are tokenized by a pool of worker processes in chunks, written in input order through
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` with the tokenizer's EOD appended to each.
Both files appear atomically (written under a temporary name, renamed when complete).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from ..errors import BadLineError, ConfigError, DataError, WorkerDiedError
from ..runtime.progress import progress as progress_bar
from .jsonl import json_object, string_field
from .tokenizers import Tokenizer, load_tokenizer

__all__ = ["BadLineError", "PreprocessSummary", "WorkerDiedError", "build_indexed_dataset"]


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


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, tokenizer_kind: str | None, key: str) -> None:
    _WORKER["tok"] = load_tokenizer(tokenizer_path, tokenizer_kind)
    _WORKER["key"] = key


def parse_line(line: str | bytes, line_no: int, key: str) -> str:
    """The document text of one jsonl line; BadLineError names the line and what is wrong with it."""
    return string_field(json_object(line, line_no), key, line_no, hint="pass --json-key to choose the text field")


def _encode_chunk(chunk: tuple[int, list[bytes]]) -> list[tuple[int, np.ndarray | None, str | None]]:
    """[(line_no, ids (EOD appended) or None, error or None)] for a chunk of lines starting at ``first``."""
    first, lines = chunk
    tok: Tokenizer = _WORKER["tok"]
    out = []
    for offset, line in enumerate(lines):
        line_no = first + offset
        if not line.strip():
            continue  # blank lines between documents carry nothing
        try:
            text = parse_line(line, line_no, _WORKER["key"])
        except BadLineError as error:
            out.append((line_no, None, str(error)))
            continue
        ids = tok.encode(text) if text else []
        # int32 arrays pickle back to the parent far faster than lists of Python ints.
        out.append((line_no, np.asarray(ids + [tok.eod] if ids else [], dtype=np.int32), None))
    return out


def _chunks(path: Path, size: int):
    # Bytes, decoded per line by the worker: a line that is not UTF-8 is then a bad line with its number.
    with open(path, "rb") as handle:
        line_no = 1
        while True:
            lines = list(islice(handle, size))
            if not lines:
                return
            yield line_no, lines
            line_no += len(lines)


def _ordered_results(pool: ProcessPoolExecutor, chunks, in_flight: int):
    """Results of ``_encode_chunk`` in input order, with at most ``in_flight`` chunks submitted (bounded memory).

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
                    pending.append((chunk[0], pool.submit(_encode_chunk, chunk)))
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


def token_dtype(vocab_size: int):
    # uint16 halves the .bin when every id fits, as Megatron-LM does.
    return np.uint16 if vocab_size < 65500 else np.int32


def build_indexed_dataset(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    tokenizer_kind: str | None = None,
    json_key: str = "text",
    workers: int = 1,
    chunk_lines: int = 64,
    skip_bad_lines: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
) -> PreprocessSummary:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input {input_path} does not exist")
    if input_path.stat().st_size == 0:
        raise DataError(f"input {input_path} is empty: nothing to tokenize")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
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
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=token_dtype(tokenizer.vocab_size))
    documents = tokens = skipped = empty = 0
    start = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker,
                               (str(tokenizer_path), tokenizer_kind, json_key)) if workers > 1 else None
    finished = False
    try:
        if pool is None:
            _init_worker(str(tokenizer_path), tokenizer_kind, json_key)
            results = map(_encode_chunk, _chunks(input_path, chunk_lines))
        else:
            results = _ordered_results(pool, _chunks(input_path, chunk_lines), in_flight=4 * workers)
        with progress_bar(total=None, desc="tokenizing", unit="doc", enabled=progress is not False) as bar:
            for chunk in results:
                for _line_no, ids, error in chunk:
                    if error is not None:
                        if not skip_bad_lines:
                            raise BadLineError(f"{input_path}: {error} (pass --skip-bad-lines to skip such lines)")
                        skipped += 1
                        continue
                    if not len(ids):
                        empty += 1
                        continue
                    builder.add_item(torch.from_numpy(ids))
                    builder.end_document()
                    documents += 1
                    tokens += len(ids)
                bar.update(len(chunk))
                bar.set_postfix(tokens=tokens, refresh=False)
        if documents == 0:
            raise DataError(f"no documents in {input_path} could be tokenized ({skipped} bad lines, {empty} empty)")
        builder.finalize(str(tmp_idx))
        finished = True
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if not finished:  # an error or an interrupt: leave no half-written dataset behind
            builder.data_file.close()
            for path in (tmp_bin, tmp_idx):
                path.unlink(missing_ok=True)
    # As a pair: without the old index a reader finds no dataset, never a new .bin under an old .idx.
    outputs[1].unlink(missing_ok=True)
    os.replace(tmp_bin, outputs[0])
    os.replace(tmp_idx, outputs[1])
    return PreprocessSummary(str(prefix), documents, tokens, skipped, empty, time.perf_counter() - start)
