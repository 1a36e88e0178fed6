"""What the RL loop reads: the prompts it rolls out from, and the pretraining text of the PTX loss.

Both are read and checked in full before any process group or model exists, so a bad line stops the run with one
line naming the file, the line and what to change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.jsonl import in_file, json_object, numbered_lines, string_field
from ..errors import BadLineError, DataError
from ..runtime.device import HOST


def _jsonl_values(path: str | Path, key: str, what: str) -> list[tuple[int, str]]:
    """``(line number, value of key)`` of each non-blank line; BadLineError / DataError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    values = []
    for line_no, line in numbered_lines(path):
        try:
            values.append((line_no, string_field(json_object(line, line_no), key, line_no)))
        except BadLineError as error:
            raise in_file(path, error) from None
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
        for line_no, text in _jsonl_values(path, "prompt", "prompt data"):
            ids = tokenizer.encode(text)
            if not ids:
                raise BadLineError(f"{path}: line {line_no}: the prompt is empty after tokenization")
            if len(ids) > max_prompt_tokens:
                raise BadLineError(f"{path}: line {line_no}: the prompt has {len(ids)} tokens, over the budget of "
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

    ``batch(position, count)`` returns ``tokens``, ``labels`` and ``loss_mask``, each ``(count, length)`` on the host
    (the caller moves them with the micro-batch they join), cycling through the rows in file order (the position is
    the number of rows consumed so far, restored on resume).
    """

    def __init__(self, path: str | Path, tokenizer, length: int):
        stream: list[int] = []
        for _, text in _jsonl_values(path, "text", "PTX data"):
            stream += tokenizer.encode(text) + [tokenizer.eod]
        if len(stream) < 2:
            raise DataError(f"PTX data {path} has fewer than 2 tokens")
        self.length, self.pad = length, tokenizer.pad
        self.rows = [stream[i:i + length + 1] for i in range(0, len(stream) - 1, length)]

    def batch(self, position: int, count: int) -> dict[str, torch.Tensor]:
        n = self.length
        tokens = torch.full((count, n), self.pad, dtype=torch.long, device=HOST)
        labels = torch.full((count, n), self.pad, dtype=torch.long, device=HOST)
        mask = torch.zeros(count, n, device=HOST)
        for i in range(count):
            row = self.rows[(position + i) % len(self.rows)]
            m = len(row) - 1
            tokens[i, :m] = torch.tensor(row[:-1], device=HOST)
            labels[i, :m] = torch.tensor(row[1:], device=HOST)
            mask[i, :m] = 1.0
        return {"tokens": tokens, "labels": labels, "loss_mask": mask}
