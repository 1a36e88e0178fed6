"""Reading jsonl inputs: one set of line checks and one wording for every reader (pretraining documents, SFT
records, preference pairs, prompts, PTX text).

A line's problem is a ``BadLineError`` whose message starts with ``line N:``; the reader that knows the file puts
``<path>: `` in front (``in_file``), so every message reads ``<path>: line N: <what is wrong>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import BadLineError


def json_object(line: str | bytes, line_no: int) -> dict:
    """The JSON object on one line; ``BadLineError`` when it is not UTF-8, not JSON, or not an object."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadLineError(f"line {line_no}: not valid UTF-8 (byte {error.start + 1} of the line)") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        # json's own message may end in "at" ("Unterminated string starting at"): one "at" before the column.
        raise BadLineError(f"line {line_no}: not valid JSON ({error.msg.removesuffix(' at')} at column "
                           f"{error.colno})") from None
    if not isinstance(record, dict):
        raise BadLineError(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def string_field(record: dict, key: str, line_no: int, hint: str = "") -> str:
    """``record[key]`` when it is a string; ``BadLineError`` naming the keys there are (``hint``: what to change)."""
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise BadLineError(f"line {line_no}: no key '{key}' (keys: {keys}){'; ' + hint if hint else ''}")
    value = record[key]
    if not isinstance(value, str):
        raise BadLineError(f"line {line_no}: '{key}' is a {type(value).__name__}, not a string")
    return value


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each non-blank line of a UTF-8 text file; a line that is not UTF-8 is a
    ``BadLineError`` that already names the file."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:  # named here: a decoding text file would stop with a traceback
                raise BadLineError(f"{path}: line {line_no}: not valid UTF-8 (byte {error.start + 1} of the "
                                   "line)") from None
            if line.strip():
                yield line_no, line


def in_file(path: str | Path, error: BadLineError, suffix: str = "") -> BadLineError:
    """``error`` with the file in front (and ``suffix`` after), to raise ``from None`` where the file is known."""
    return BadLineError(f"{path}: {error}{suffix}")
