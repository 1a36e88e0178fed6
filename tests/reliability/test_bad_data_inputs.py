"""Bad SFT records and tokenizer choices are refused with one line naming the file (issue 13, item 5)."""

from __future__ import annotations

import json

import pytest

from megatron_patch.data.sft import read_records
from megatron_patch.data.tokenizers import load_tokenizer
from megatron_patch.errors import ConfigError, DataError


@pytest.mark.parametrize("record,message", [
    ({"instruction": 5, "output": "x"}, '"instruction" must be a string (got int)'),
    ({"instruction": "q", "input": ["a"], "output": "x"}, '"input" must be a string (got list)'),
    ({"instruction": "q", "output": None}, '"output" must be a string (got NoneType)'),
    ({"messages": [{"content": "hi"}]}, '"messages" must be a list of {"role", "content"} objects'),
    ({"messages": [{"role": "user", "content": 3}]}, 'a message\'s "role" and "content" must be strings'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]},
     "unknown role 'asistant' (expected one of system, user, assistant, tool)"),
    ({"instruction": "q", "output": " "}, '"output" is empty (nothing to train on)'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     '"messages" has no assistant turn with content (nothing to train on)'),
])
def test_sft_record_fields_are_checked(tmp_path, record, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"instruction": "fine", "output": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value) == f"{path}: line 2: {message}"


def test_sentencepiece_kind_on_a_hf_directory(tmp_path):
    from megatron_patch.models.tiny import train_tokenizer

    train_tokenizer(tmp_path / "tok", vocab_size=300)
    with pytest.raises(ConfigError, match="holds no tokenizer.model .*leave --tokenizer-type out"):
        load_tokenizer(tmp_path / "tok", "sentencepiece")
    assert load_tokenizer(tmp_path / "tok").kind == "hf"


def test_a_line_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    """SFT, preference and prompt files are read through one line reader: a stray byte was a UnicodeDecodeError."""
    from megatron_patch.generation.prompts import read_prompts

    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2: not valid UTF-8 \(byte 18 of the line\)$"):
        read_records(path)
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"hello\n\xff\n")
    with pytest.raises(DataError, match=rf"^{text}: not valid UTF-8 \(byte 7 of the file\)$"):
        read_prompts(text)
