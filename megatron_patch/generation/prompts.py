"""Prompts in, completions out: the input file formats, the checkpoint's tokenizer as a codec, the atomic output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import DataError


def read_prompts(path: str | os.PathLike, prompt_key: str = "prompt") -> list[str]:
    """Prompts from a .jsonl file (``prompt_key`` of each object) or a text file (one per non-empty line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = []
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(prompt_key), str):
                raise DataError(f"{path}:{number} has no string field '{prompt_key}' (set --prompt-key)")
            prompts.append(record[prompt_key])
    else:
        prompts = [line for line in lines if line.strip()]
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
