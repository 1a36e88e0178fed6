"""What the RL loop reads: the prompts it rolls out from, and the pretraining text of the PTX loss.

Both are read and checked in full before any process group or model exists, so a bad line stops the run with one
line naming the file, the line and what to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import BadLineError, DataError


def _jsonl_values(path: str | Path, key: str, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    values = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BadLineError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                raise BadLineError(f'{path}:{line_no}: expected {{"{key}": "..."}}; found {found}')
            values.append(record[key])
    if not values:
        raise DataError(f"{what} {path} has no lines")
    return values


class PromptDataset:
    """Tokenised prompts, served in a seeded order that is a function of the position alone (so a resumed run
    reads the same prompts as an uninterrupted one): pass ``p`` of the data is permutation ``seed + p``.

    Args:
        path: jsonl with a ``"prompt"`` string per line.
        tokenizer: the toolkit's tokenizer (``encode``).
        max_prompt_tokens: the budget (``--seq-length - --max-new-tokens``); a longer prompt is an error.
        seed: order seed.
    """

    def __init__(self, path: str | Path, tokenizer, max_prompt_tokens: int, seed: int = 1234):
        self.prompts: list[list[int]] = []
        for line_no, text in enumerate(_jsonl_values(path, "prompt", "prompt data"), 1):
            ids = tokenizer.encode(text)
            if not ids:
                raise DataError(f"{path}: prompt {line_no} is empty after tokenization")
            if len(ids) > max_prompt_tokens:
                raise DataError(f"{path}: prompt {line_no} has {len(ids)} tokens, over the budget of "
                                f"{max_prompt_tokens} (--seq-length minus --max-new-tokens): raise --seq-length or "
                                f"lower --max-new-tokens")
            self.prompts.append(ids)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, position: int, count: int) -> list[list[int]]:
        """``count`` prompts starting at global ``position`` (passes wrap around with a fresh order)."""
        out = []
        for index in range(position, position + count):
            epoch, offset = divmod(index, len(self.prompts))
            order = np.random.RandomState(self.seed + epoch).permutation(len(self.prompts))
            out.append(self.prompts[order[offset]])
        return out


class PtxDataset:
    """Pretraining text for the PTX loss: each ``"text"`` line tokenised with EOS, cut into rows of ``length``.

    ``rows(position, count)`` returns ``(tokens, labels, loss_mask)``, each ``(count, length)``, cycling through
    the rows in file order (the position is the number of rows consumed so far, restored on resume).
    """

    def __init__(self, path: str | Path, tokenizer, length: int):
        stream: list[int] = []
        for text in _jsonl_values(path, "text", "PTX data"):
            stream += tokenizer.encode(text) + [tokenizer.eod]
        if len(stream) < 2:
            raise DataError(f"PTX data {path} has fewer than 2 tokens")
        self.length, self.pad = length, tokenizer.pad
        self.rows = [stream[i:i + length + 1] for i in range(0, len(stream) - 1, length)]

    def batch(self, position: int, count: int) -> dict[str, torch.Tensor]:
        n = self.length
        tokens = torch.full((count, n), self.pad, dtype=torch.long)
        labels = torch.full((count, n), self.pad, dtype=torch.long)
        mask = torch.zeros(count, n)
        for i in range(count):
            row = self.rows[(position + i) % len(self.rows)]
            m = len(row) - 1
            tokens[i, :m], labels[i, :m], mask[i, :m] = torch.tensor(row[:-1]), torch.tensor(row[1:]), 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": mask}
