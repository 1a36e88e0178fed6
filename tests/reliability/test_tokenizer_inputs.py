"""Tokenizers that ask for their own code and chat templates that trip jinja's sandbox are refused in one line
(issue 23, items 5 and 7); generation, training and preprocessing all load through ``load_tokenizer``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_patch.data.preprocess import main as preprocess_main
from megatron_patch.data.sft import SFTDataset
from megatron_patch.data.tokenizers import load_tokenizer
from megatron_patch.errors import DataError

from .conftest import refused


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    from megatron_patch.models.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tokenizer(path, vocab_size=300)
    return path


def _with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.update(changes)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("keep_fast_file", [True, False], ids=["with-tokenizer.json", "code-only"])
def test_a_tokenizer_asking_for_its_own_code_is_refused(plain_tokenizer, tmp_path, capsys, keep_fast_file):
    tok = _with_config(plain_tokenizer, tmp_path / "tok", auto_map={"AutoTokenizer": ["tokenization_x.XTok", None]})
    (tok / "tokenization_x.py").write_text("open(__file__ + '.ran', 'w')\n")
    if not keep_fast_file:
        (tok / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"needs its own Python code \(tokenizer_config.json auto_map: "
                                        r"tokenization_x.XTok\), which this toolkit does not run"):
        load_tokenizer(tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "hello"}) + "\n")
    code = preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tok)])
    refused(code, capsys, "which this toolkit does not run")
    assert not (tok / "tokenization_x.py.ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tok"]


def test_a_chat_template_tripping_the_sandbox_is_one_line(plain_tokenizer, tmp_path):
    tok = _with_config(plain_tokenizer, tmp_path / "tok",
                       chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"chat template of the tokenizer in .* cannot be rendered: SecurityError"):
        SFTDataset(data, load_tokenizer(tok), length=32)
