"""Preference pairs: layout of a pair, both halves in one micro-batch, bad lines named or skipped."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_patch.data.indexed import BadLineError
from megatron_patch.data.preference import PreferenceDataset, collate_preference_pairs, split_chosen_rejected
from megatron_patch.data.tokenizers import Tokenizer


class CharTokenizer(Tokenizer):
    """One id per character (a=1 ... z=26, space=27), EOS 0: layouts can be read off by eye."""

    kind = "test-chars"

    def encode(self, text):
        return [27 if c == " " else ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids):
        return "".join(" " if i == 27 else "<eos>" if i == 0 else chr(i - 1 + ord("a")) for i in ids)

    @property
    def eod(self):
        return 0

    @property
    def pad(self):
        return 28

    @property
    def vocab_size(self):
        return 29


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_pair_layout(tmp_path):
    data = PreferenceDataset(write(tmp_path / "p.jsonl", [{"prompt": "ab", "chosen": "cd", "rejected": "e"}]),
                             CharTokenizer(), seq_length=6)
    item = data[0]
    assert item["tokens"].tolist() == [[1, 2, 3, 4, 0, 28], [1, 2, 5, 0, 28, 28]]
    assert item["labels"].tolist() == [[2, 3, 4, 0, 28, 28], [2, 5, 0, 28, 28, 28]]
    # the mask covers labels that are response tokens: "cd<eos>" and "e<eos>"
    assert item["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert item["last_index"].tolist() == [4, 3]
    assert data.truncated == 0


def test_long_response_is_cut_and_the_prompt_kept(tmp_path):
    data = PreferenceDataset(write(tmp_path / "p.jsonl", [{"prompt": "ab", "chosen": "cdefgh", "rejected": "e"}]),
                             CharTokenizer(), seq_length=4)
    assert data[0]["tokens"][0].tolist() == [1, 2, 3, 4]
    assert data[0]["loss_mask"][0].tolist() == [0, 1, 1, 0]
    assert data[0]["last_index"][0].item() == 3 and data.truncated == 1


def test_pairs_stay_in_one_micro_batch(tmp_path):
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
               [("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i")]]
    data = PreferenceDataset(write(tmp_path / "p.jsonl", records), CharTokenizer(), seq_length=4)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_preference_pairs)
    first, second = list(loader)
    assert first["tokens"].shape == (4, 4) and second["tokens"].shape == (2, 4)
    chosen, rejected = split_chosen_rejected(first["tokens"])
    assert chosen[:, :2].tolist() == [[1, 2], [4, 5]] and rejected[:, :2].tolist() == [[1, 3], [4, 6]]
    assert [t.tolist() for t in split_chosen_rejected(second["last_index"])] == [[2], [2]]


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not valid JSON"),
    ('["a"]', "line 2: expected a JSON object, got list"),
    ({"prompt": "a", "chosen": "b"}, "line 2: missing 'rejected'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "line 2: 'chosen' is a int, not a string"),
    ({"prompt": "a", "chosen": "b", "rejected": "  "}, "line 2: 'rejected' is an empty response"),
    ({"prompt": "", "chosen": "b", "rejected": "c"}, "line 2: 'prompt' encodes to no tokens"),
    ({"prompt": "abcdef", "chosen": "b", "rejected": "c"}, "line 2: the prompt has 6 tokens, which leaves no room"),
])
def test_bad_lines_are_named_or_skipped(tmp_path, line, message):
    good = {"prompt": "ab", "chosen": "c", "rejected": "d"}
    path = write(tmp_path / "bad.jsonl", [good, line, "", good])
    with pytest.raises(BadLineError, match=f"bad.jsonl: {message}.*pass --skip-bad-lines"):
        PreferenceDataset(path, CharTokenizer(), seq_length=6)
    data = PreferenceDataset(path, CharTokenizer(), seq_length=6, skip_bad_lines=True)
    assert len(data) == 2 and data.skipped == 1
    assert [p.line_no for p in data.pairs] == [1, 4]


def test_missing_file_and_all_bad_lines(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PreferenceDataset(tmp_path / "none.jsonl", CharTokenizer(), seq_length=6)
    path = write(tmp_path / "all_bad.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match="no usable pair \\(2 bad lines skipped\\)"):
        PreferenceDataset(path, CharTokenizer(), seq_length=6, skip_bad_lines=True)
