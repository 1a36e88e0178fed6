"""Prompts in, completions out: the input file formats, the checkpoint's tokenizer as a codec, the atomic output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..data.jsonl import in_file, json_object, numbered_lines, string_field
from ..errors import BadLineError, DataError


def read_prompts(path: str | os.PathLike, prompt_key: str = "prompt") -> list[str]:
    """Prompts from a .jsonl file (``prompt_key`` of each object) or a text file (one per non-empty line)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        prompts = []
        for line_no, line in numbered_lines(path):
            try:
                prompts.append(string_field(json_object(line, line_no), prompt_key, line_no, hint="set --prompt-key"))
            except BadLineError as error:
                raise in_file(path, error) from None
    else:
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 (byte {error.start + 1} of the file)") from None
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` as jsonl to a temporary sibling of ``path``, then rename it: readers never see half a file."""
    from ..checkpoint.atomic import apply_umask_modes

    path = Path(path).absolute()
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        apply_umask_modes(temp)  # readable as a plain open() would leave it, not mkstemp's 0600
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)  # gone already after the rename; removed on any error or interrupt


class PromptCodec:
    """Text <-> ids with the checkpoint's own tokenizer (``hf_assets/``), as its HF original would encode them:
    a HF tokenizer adds the special tokens its config asks for (e.g. llama's BOS)."""

    def __init__(self, assets_dir: Path):
        from ..data.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(assets_dir)
        self.hf = getattr(self.tokenizer, "tok", None)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text) if self.hf is not None else self.tokenizer.encode(text)

    def decode(self, ids: list[int], eos_ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([t for t in ids if t not in eos_ids])
