"""The tokenizing half of preprocessing: a chunk of whole jsonl lines (bytes) in, one token array per chunk out.

Kept apart from ``indexed.py`` so that a spawned worker imports only this and its light dependencies (json, numpy,
the tokenizer's own library), never torch or megatron-core: a worker starts in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadLineError
from .jsonl import json_object, string_field


@dataclass
class EncodedChunk:
    """What a worker sends back: numpy arrays (cheap to pickle), never lists of Python ints."""

    first_line: int
    nbytes: int
    tokens: np.ndarray  # every non-empty document's ids followed by EOD, in the dataset's dtype
    lengths: np.ndarray  # int64, one per non-empty document (EOD included)
    bad_lines: list[str] = field(default_factory=list)  # "line N: what is wrong", in input order
    empty: int = 0  # documents whose text encodes to nothing (they get no EOD and no entry, as before)


@dataclass
class EncodeSettings:
    encode: Callable[[str], list[int]]  # picklable: Tokenizer.worker_encoder()
    key: str
    eod: int
    dtype: type


_SETTINGS: list[EncodeSettings] = []


def init_worker(settings: EncodeSettings) -> None:
    # One worker = one core: the Rust tokenizer's own thread pool would otherwise compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _SETTINGS[:] = [settings]


def parse_line(line: str | bytes, line_no: int, key: str) -> str:
    """The document text of one jsonl line; BadLineError names the line and what is wrong with it."""
    return string_field(json_object(line, line_no), key, line_no, hint="pass --json-key to choose the text field")


def encode_chunk(chunk: tuple[int, bytes]) -> EncodedChunk:
    """Tokenize the lines of ``chunk = (number of its first line, bytes of whole lines)``."""
    first_line, data = chunk
    settings = _SETTINGS[0]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the text after the chunk's last newline is empty
    pieces: list[list[int]] = []
    bad: list[str] = []
    empty = 0
    for offset, line in enumerate(lines):
        if not line.strip():
            continue  # blank lines between documents carry nothing
        try:
            text = parse_line(line, first_line + offset, settings.key)
        except BadLineError as error:
            bad.append(str(error))
            continue
        ids = settings.encode(text) if text else []
        if not ids:
            empty += 1
            continue
        ids.append(settings.eod)
        pieces.append(ids)
    lengths = np.fromiter((len(ids) for ids in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.fromiter((t for ids in pieces for t in ids), dtype=settings.dtype, count=int(lengths.sum()))
    return EncodedChunk(first_line, len(data), tokens, lengths, bad, empty)


def read_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(first line number, whole lines)`` of about ``chunk_bytes`` each: chunks sized by bytes keep every worker's
    share of the work alike however long the documents are. A line longer than a chunk makes a chunk of its own."""
    with open(path, "rb", buffering=0) as handle:
        line_no, unfinished = 1, []  # the pieces of a line still waiting for its newline
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                if unfinished:
                    yield line_no, b"".join(unfinished)
                return
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                unfinished.append(block)
                continue
            data = b"".join([*unfinished, block[:cut]])
            unfinished = [block[cut:]] if cut < len(block) else []
            yield line_no, data
            line_no += data.count(b"\n")
