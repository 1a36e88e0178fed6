"""Every jsonl reader checks a line the same way and says so in the same words: ``<path>: line N: <what>``."""

from __future__ import annotations

import pytest

from megatron_patch.data.indexed import parse_line
from megatron_patch.data.preference import read_preference_pairs
from megatron_patch.data.sft import read_records
from megatron_patch.errors import BadLineError
from megatron_patch.generation.prompts import read_prompts
from megatron_patch.rlhf.ppo.rollout_data import PromptDataset, PtxDataset

# Each reader stops at the first bad line before it tokenizes anything, so no tokenizer is needed here.
READERS = {
    "sft": lambda path: read_records(path),
    "preference": lambda path: read_preference_pairs(path, tokenizer=None, seq_length=16),
    "generation prompts": lambda path: read_prompts(path),
    "rl prompts": lambda path: PromptDataset(path, tokenizer=None, max_prompt_tokens=8),
    "ptx": lambda path: PtxDataset(path, tokenizer=None, length=8),
    "pretraining documents": lambda path: parse_line(path.read_text().splitlines()[1], 2, "text"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("line,problem", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('"text"', "expected a JSON object, got str"),
])
def test_bad_line_named_alike_by_every_reader(tmp_path, reader, line, problem):
    path = tmp_path / "in.jsonl"
    path.write_text("\n" + line + "\n")  # a blank first line: numbers count every line of the file
    with pytest.raises(BadLineError) as error:
        READERS[reader](path)
    where = "" if reader == "pretraining documents" else f"{path}: "  # that reader's caller adds the file
    assert str(error.value).startswith(f"{where}line 2: {problem}"), str(error.value)


@pytest.mark.parametrize("value,problem", [(None, "no key 'prompt' (keys: other)"),
                                           (3, "'prompt' is a int, not a string")])
def test_missing_and_non_string_fields(tmp_path, value, problem):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"other": 1} if value is None else {"prompt": value}) + "\n")
    for read in (READERS["generation prompts"], READERS["rl prompts"]):
        with pytest.raises(BadLineError) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: line 1: {problem}"), str(error.value)
