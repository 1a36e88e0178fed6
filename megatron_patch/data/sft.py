"""Supervised finetuning samples from jsonl: ``{"instruction", "input", "output"}`` or ``{"messages": [...]}``.

The loss covers response tokens only (assistant turns / ``output``, with the closing EOS). Each sample is either
padded to ``length`` (one sample per sequence, causal attention), or several samples are packed into one sequence:
then attention is block-diagonal causal (a token sees only earlier tokens of its own sample) and position ids
restart at 0 for each sample.

Note on positions: megatron-core's RoPE rotates by the position within the sequence. RoPE attention scores depend
only on the query-key distance, so with the block-diagonal mask a packed sample gets exactly the scores it would
get at positions 0..n (the ``position_ids`` we emit are the restarted ones, for absolute-position models).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import BadLineError, DataError
from .jsonl import in_file, json_object, numbered_lines
from .tokenizers import Tokenizer

# Used when the tokenizer has no chat template (Alpaca's prompt layout).
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


SCHEMA = '{"instruction": ..., "input": ... (optional), "output": ...} or {"messages": [{"role", "content"}, ...]}'
# The roles chat templates know; only "assistant" turns are trained on. Any other role (a typo such as "asistant")
# would be rendered as prompt and silently never trained.
ROLES = ("system", "user", "assistant", "tool")


def parse_record(line: str, line_no: int) -> dict:
    """One jsonl line as an SFT record; BadLineError names the line and what is wrong with it."""
    record = json_object(line, line_no)
    where = f"line {line_no}"
    if not ("messages" in record or {"instruction", "output"} <= set(record)):
        raise BadLineError(f"{where}: expected {SCHEMA}; found keys {sorted(record)}")
    if "messages" in record and not (isinstance(record["messages"], list) and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in record["messages"])):
        raise BadLineError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
    for message in record.get("messages", []):
        if not (isinstance(message["role"], str) and isinstance(message["content"], str)):
            raise BadLineError(f'{where}: a message\'s "role" and "content" must be strings')
        if message["role"] not in ROLES:
            raise BadLineError(f'{where}: unknown role {message["role"]!r:.40} (expected one of {", ".join(ROLES)})')
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise BadLineError(f'{where}: "{key}" must be a string (got {type(record[key]).__name__})')
    # A sample whose response is empty teaches only the end-of-text token.
    if "messages" in record and not any(m["role"] == "assistant" and m["content"].strip() for m in record["messages"]):
        raise BadLineError(f'{where}: "messages" has no assistant turn with content (nothing to train on)')
    if "messages" not in record and not record["output"].strip():
        raise BadLineError(f'{where}: "output" is empty (nothing to train on)')
    return record


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The records of an SFT jsonl file (the first ``limit`` non-empty lines when given: a cheap schema check)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} does not exist")
    records = []
    for line_no, line in numbered_lines(path):
        try:
            records.append(parse_record(line, line_no))
        except BadLineError as error:
            raise in_file(path, error) from None
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"SFT data {path} has no samples")
    return records


def encode_record(record: dict, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, is_response) for one record; ids end with EOS (a response token, so the model learns to stop)."""
    if "messages" in record:
        messages = record["messages"]
    else:
        user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    templated = tokenizer.chat_template_ids(messages)
    if templated is not None:
        ids, mask = templated
    elif "messages" not in record:
        prompt = (PROMPT_WITH_INPUT if record.get("input") else PROMPT).format(**{"input": "", **record})
        p, r = tokenizer.encode(prompt), tokenizer.encode(record["output"])
        ids, mask = p + r, [False] * len(p) + [True] * len(r)
    else:
        ids, mask = [], []
        for message in messages:
            head = tokenizer.encode(f"{message['role']}: ")
            body = tokenizer.encode(message["content"] + "\n")
            is_response = message["role"] == "assistant"
            ids += head + body
            mask += [False] * len(head) + [is_response] * len(body)
    return ids + [tokenizer.eod], mask + [True]


class SFTDataset(torch.utils.data.Dataset):
    """Sequences of ``length`` tokens: dicts of tokens, labels, loss_mask, position_ids (+ attention_mask when
    packing), as the training forward step reads them."""

    def __init__(self, path, tokenizer: Tokenizer, length: int, packing: bool = False, seed: int = 1234):
        self.length, self.packing, self.pad = length, packing, tokenizer.pad
        samples = []
        for record in read_records(path):
            ids, mask = encode_record(record, tokenizer)
            ids, mask = ids[: length + 1], mask[: length + 1]  # inputs and shifted labels both fit in `length`
            if len(ids) >= 2 and any(mask[1:]):
                samples.append((ids, mask))
        if not samples:
            raise DataError(f"no sample of {path} has a response token within {length} tokens")
        order = np.random.RandomState(seed).permutation(len(samples))
        samples = [samples[i] for i in order]
        self.sequences = self._pack(samples) if packing else [[s] for s in samples]

    def _pack(self, samples):
        """Greedy first-fit in order: a sample of n ids uses n - 1 positions (inputs and labels are shifted)."""
        sequences, current, used = [], [], 0
        for sample in samples:
            need = len(sample[0]) - 1
            if current and used + need > self.length:
                sequences.append(current)
                current, used = [], 0
            current.append(sample)
            used += need
        if current:
            sequences.append(current)
        return sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = self.length
        tokens = torch.full((n,), self.pad, dtype=torch.long)
        labels = torch.full((n,), self.pad, dtype=torch.long)
        loss_mask = torch.zeros(n, dtype=torch.float)
        position_ids = torch.zeros(n, dtype=torch.long)
        segment = torch.full((n,), -1, dtype=torch.long)
        start = 0
        for seg_id, (ids, mask) in enumerate(self.sequences[index]):
            m = len(ids) - 1
            tokens[start:start + m] = torch.tensor(ids[:-1])
            labels[start:start + m] = torch.tensor(ids[1:])
            loss_mask[start:start + m] = torch.tensor(mask[1:], dtype=torch.float)
            position_ids[start:start + m] = torch.arange(m)
            segment[start:start + m] = seg_id
            start += m
        position_ids[start:] = torch.arange(n - start)
        item = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if self.packing:
            # True = masked out (megatron-core's convention). Padding tokens attend only to themselves.
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            same = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
            allowed = causal & (same | torch.eye(n, dtype=torch.bool))
            item["attention_mask"] = (~allowed).unsqueeze(0)
        return item


def write_demo_sft(corpus: str | Path, path: str | Path, limit: int | None = None) -> str:
    """A toy instruction set from a text corpus (one sentence per sample: echo it back), for demos and tests."""
    sentences = [s.strip() + "." for line in Path(corpus).read_text().splitlines() for s in line.split(".") if s.strip()]
    with open(path, "w", encoding="utf-8") as handle:
        for sentence in sentences[:limit]:
            handle.write(json.dumps({"instruction": "Repeat the sentence.", "input": sentence,
                                     "output": sentence}) + "\n")
    return str(path)
