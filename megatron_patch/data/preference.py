"""Preference pairs from jsonl ``{"prompt", "chosen", "rejected"}``, for reward-model training and DPO.

Each line holds one prompt and two responses, the preferred one first. A dataset item is the *pair*: both
sequences stacked on a leading dimension of 2, so a sampler can never put the two halves of a pair into
different micro-batches (pipeline schedules split a global batch into micro-batches by items). A micro-batch of
``k`` pairs is collated by ``collate_preference_pairs`` into ``2k`` rows: the ``k`` chosen rows first, then the
``k`` rejected rows in the same order (``split_chosen_rejected`` undoes it).

Sequence layout (one row, length ``seq_length``): ``tokens`` = prompt ids + response ids + EOS, right-padded;
``labels[t] = tokens[t + 1]`` (next-token targets for DPO's log-probs); ``loss_mask[t] = 1`` where ``labels[t]``
is a response token (EOS included); ``last_index`` = position of the last real token (the reward model's score is
read there). A pair longer than ``seq_length`` keeps its whole prompt and loses the end of its response.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadLineError, ConfigError, DataError
from .jsonl import in_file, json_object, numbered_lines, string_field
from .tokenizers import Tokenizer

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized pair: the prompt's ids and each response's ids (EOS appended)."""

    line_no: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def parse_preference_line(line: str, line_no: int) -> dict:
    """The record of one jsonl line; BadLineError names the line and what is wrong with it."""
    record = json_object(line, line_no)
    missing = [key for key in FIELDS if key not in record]
    if missing:
        raise BadLineError(f"line {line_no}: missing {', '.join(repr(k) for k in missing)} "
                           f"(each line needs \"prompt\", \"chosen\", \"rejected\")")
    for key in FIELDS:
        string_field(record, key, line_no)
    for key in ("chosen", "rejected"):
        if not record[key].strip():
            raise BadLineError(f"line {line_no}: '{key}' is an empty response")
    return record


def encode_pair(record: dict, line_no: int, tokenizer: Tokenizer, seq_length: int) -> PreferencePair:
    """Token ids of a record; BadLineError when the prompt leaves no room for a response within ``seq_length``."""
    prompt = tokenizer.encode(record["prompt"])
    if not prompt:
        raise BadLineError(f"line {line_no}: 'prompt' encodes to no tokens (the first response token is predicted "
                           f"from the prompt)")
    if len(prompt) >= seq_length:
        raise BadLineError(f"line {line_no}: the prompt has {len(prompt)} tokens, which leaves no room for a "
                           f"response within the sequence length {seq_length} (raise --seq-length)")
    chosen, rejected = tokenizer.encode(record["chosen"]), tokenizer.encode(record["rejected"])
    for key, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise BadLineError(f"line {line_no}: '{key}' encodes to no tokens")
    return PreferencePair(line_no, prompt, chosen + [tokenizer.eod], rejected + [tokenizer.eod])


def read_preference_pairs(path: str | Path, tokenizer: Tokenizer, seq_length: int,
                          skip_bad_lines: bool = False, limit: int | None = None) -> tuple[list[PreferencePair], int]:
    """All pairs of a jsonl file (of its first ``limit`` lines: a launch's pre-flight) and the bad lines skipped.

    A bad line (not JSON, a missing or non-string field, an empty response, a prompt that fills the sequence)
    raises ``BadLineError`` naming the file and line, unless ``skip_bad_lines``. Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data {path} does not exist")
    if seq_length < 2:
        raise ConfigError(f"the sequence length must be >= 2 to hold a prompt and a response, got {seq_length}")
    pairs, skipped = [], 0
    for line_no, line in numbered_lines(path):
        if limit is not None and line_no > limit:
            break
        try:
            pairs.append(encode_pair(parse_preference_line(line, line_no), line_no, tokenizer, seq_length))
        except BadLineError as error:
            if not skip_bad_lines:
                raise in_file(path, error, " (pass --skip-bad-lines to skip such lines)") from None
            skipped += 1
    if not pairs:
        raise DataError(f"preference data {path} has no usable pair ({skipped} bad lines skipped)")
    return pairs, skipped


def encode_sequence(prompt: list[int], response: list[int], seq_length: int, pad: int) -> dict[str, torch.Tensor]:
    """One row of the layout in the module docstring (the response is cut to fit ``seq_length``)."""
    ids = (prompt + response)[:seq_length]
    n = len(ids)
    tokens = torch.full((seq_length,), pad, dtype=torch.long)
    tokens[:n] = torch.tensor(ids, dtype=torch.long)
    labels = torch.full((seq_length,), pad, dtype=torch.long)
    labels[: n - 1] = tokens[1:n]
    loss_mask = torch.zeros(seq_length, dtype=torch.float)
    loss_mask[len(prompt) - 1: n - 1] = 1.0  # label t is response token t + 1 - len(prompt)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_length, dtype=torch.long),
            "last_index": torch.tensor(n - 1, dtype=torch.long)}


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs of a preference jsonl; item ``i`` holds pair ``i``'s chosen (row 0) and rejected (row 1) sequences.

    Attributes:
        pairs: the tokenized pairs, in file order.
        skipped: bad lines skipped (0 unless ``skip_bad_lines``).
        truncated: pairs whose chosen or rejected response was cut to fit ``seq_length``.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_length: int, skip_bad_lines: bool = False,
                 limit: int | None = None):
        self.seq_length, self.pad = seq_length, tokenizer.pad
        self.pairs, self.skipped = read_preference_pairs(path, tokenizer, seq_length, skip_bad_lines, limit)
        self.truncated = sum(
            len(p.prompt) + max(len(p.chosen), len(p.rejected)) > seq_length for p in self.pairs
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[index]
        rows = [encode_sequence(pair.prompt, response, self.seq_length, self.pad)
                for response in (pair.chosen, pair.rejected)]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def collate_preference_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``k`` dataset items -> a batch of ``2k`` rows: all chosen rows, then all rejected rows, pair order kept.

    Shapes: ``tokens`` / ``labels`` / ``loss_mask`` / ``position_ids`` ``(2k, seq)``; ``last_index`` ``(2k,)``.
    """
    return {key: torch.cat([torch.stack([item[key][0] for item in items]),
                            torch.stack([item[key][1] for item in items])]) for key in items[0]}


def split_chosen_rejected(batched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values ``(2k, ...)`` of a collated batch -> ``(chosen (k, ...), rejected (k, ...))``."""
    if batched.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen, rejected), got {batched.shape[0]}")
    return batched.chunk(2, dim=0)
