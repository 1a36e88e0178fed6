"""What the RL loop reads: the prompts it rolls out from, and the pretraining text of the PTX loss.

Both are read and checked in full before any process group or model exists, so a bad line stops the run with one
line naming the file, the line and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.jsonl import in_file, json_object, numbered_lines, string_field
from ...errors import BadLineError, DataError
from ...runtime.device import HOST


def _jsonl_records(path: str | Path, key: str, what: str) -> list[tuple[int, str, dict]]:
    """``(line number, value of key, the line's other keys)`` of each non-blank line; BadLineError / DataError
    name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    values = []
    for line_no, line in numbered_lines(path):
        try:
            record = json_object(line, line_no)
            values.append((line_no, string_field(record, key, line_no), {k: v for k, v in record.items() if k != key}))
        except BadLineError as error:
            raise in_file(path, error) from None
    if not values:
        raise DataError(f"{what} {path} has no lines")
    return values


@dataclass(frozen=True)
class Prompt:
    """One prompt line: its token ids, text, the line's other keys (``answer``, ...) and its line number."""

    ids: list[int]
    text: str
    fields: dict
    line: int


class PromptDataset:
    """Tokenised prompts, served in a seeded order that is a function of the position alone (so a resumed run
    reads the same prompts as an uninterrupted one): pass ``p`` of the data is permutation ``seed + p``.

    Args:
        path: jsonl with a ``"prompt"`` string per line (other keys are kept and handed to the reward).
        tokenizer: the toolkit's tokenizer (``encode``).
        max_prompt_tokens: the budget (``--seq-length - --max-new-tokens``); a longer prompt is an error.
        seed: order seed.
        needs: keys every line must carry (the reward's, e.g. ``answer``).
        what: the file's role, for messages (``prompt data``, ``held-out prompt data``).
    """

    def __init__(self, path: str | Path, tokenizer, max_prompt_tokens: int, seed: int = 1234,
                 needs: tuple[str, ...] = (), what: str = "prompt data"):
        self.path = str(path)
        self.records: list[Prompt] = []
        for line_no, text, fields in _jsonl_records(path, "prompt", what):
            missing = [key for key in needs if key not in fields]
            if missing:
                raise BadLineError(f"{path}: line {line_no}: no key '{missing[0]}', which the reward compares the "
                                   f"response with (keys: {', '.join(sorted(['prompt', *fields]))})")
            ids = tokenizer.encode(text)
            if not ids:
                raise BadLineError(f"{path}: line {line_no}: the prompt is empty after tokenization")
            if len(ids) > max_prompt_tokens:
                raise BadLineError(f"{path}: line {line_no}: the prompt has {len(ids)} tokens, over the budget of "
                                   f"{max_prompt_tokens} (--seq-length minus --max-new-tokens): raise --seq-length or "
                                   f"lower --max-new-tokens")
            self.records.append(Prompt(ids, text, fields, line_no))
        self.seed = seed

    @property
    def prompts(self) -> list[list[int]]:
        return [record.ids for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def take_records(self, position: int, count: int) -> list[Prompt]:
        """``count`` prompts starting at global ``position`` (passes wrap around with a fresh order)."""
        out = []
        for index in range(position, position + count):
            epoch, offset = divmod(index, len(self.records))
            order = np.random.RandomState(self.seed + epoch).permutation(len(self.records))
            out.append(self.records[order[offset]])
        return out

    def take(self, position: int, count: int) -> list[list[int]]:
        return [record.ids for record in self.take_records(position, count)]


class PtxDataset:
    """Pretraining text for the PTX loss: each ``"text"`` line tokenised with EOS, cut into rows of ``length``.

    ``batch(position, count)`` returns ``tokens``, ``labels`` and ``loss_mask``, each ``(count, length)`` on the host
    (the caller moves them with the micro-batch they join), cycling through the rows in file order (the position is
    the number of rows consumed so far, restored on resume).
    """

    def __init__(self, path: str | Path, tokenizer, length: int):
        stream: list[int] = []
        for _, text, _ in _jsonl_records(path, "text", "PTX data"):
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
