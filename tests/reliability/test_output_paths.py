"""Every tool that writes refuses an empty, overlapping or current-directory output before any work (issue 23, item 1).

Each case runs the tool's entry point the way a user does and checks: exit 1, one line naming the flag, and the
user's files untouched. Tallied in ``conftest.TALLY``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.errors import ConfigError

from .conftest import TALLY, refused


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The directory the user runs the tool in, holding a file of theirs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("save", ["", " ", ".", ".."])
def test_hf2mcore_never_replaces_the_directory_it_runs_in(make_hf, user_dir, capsys, save):
    code = convert_main(["hf2mcore", "--load", make_hf("paths"), "--save", save, "--overwrite"])
    refused(code, capsys, "--save is empty" if not save.strip() else "the current directory")
    assert (user_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("save", ["", "."])
def test_mcore2hf_never_replaces_the_directory_it_runs_in(converted, user_dir, capsys, save):
    code = convert_main(["mcore2hf", "--load", str(converted), "--save", save, "--overwrite"])
    refused(code, capsys, "--save is empty" if not save else "is the current directory")
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]


def test_mcore2hf_save_inside_hf_config(converted, make_hf, tmp_path, capsys):
    """The --hf-config directory is an input too (a foreign checkpoint's config and tokenizer)."""
    code = convert_main(["mcore2hf", "--load", str(converted), "--hf-config", make_hf("paths"),
                         "--save", str(Path(make_hf("paths")) / "out")])
    refused(code, capsys, "lies inside --hf-config")


def test_demo_refuses_an_empty_workdir(user_dir, capsys):
    refused(convert_main(["demo", "--workdir", ""]), capsys, "--workdir is empty")
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("relation", ["same", "load-inside-save"])
def test_rlhf_export_never_rewrites_its_input(converted, tmp_path, capsys, relation):
    from megatron_patch.rlhf.export import main as export_main

    before = sorted(p.relative_to(converted) for p in converted.rglob("*"))
    save = converted if relation == "same" else converted.parent
    code = export_main(["--load", str(converted), "--save", str(save), "--overwrite"])
    refused(code, capsys, "--save")
    assert sorted(p.relative_to(converted) for p in converted.rglob("*")) == before


def test_rlhf_export_refuses_an_empty_save(converted, user_dir, capsys):
    from megatron_patch.rlhf.export import main as export_main

    refused(export_main(["--load", str(converted), "--save", "", "--overwrite"]), capsys, "--save is empty")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from megatron_patch.models.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(path, vocab_size=300)
    return path


@pytest.mark.parametrize("prefix,exact,expected", [
    ("", False, "--output-prefix is empty"),
    (".", True, "names a directory"),
    ("corpus", True, "is the same path as --input"),
])
def test_preprocess_never_writes_over_its_input(tmp_path, tokenizer, monkeypatch, capsys, prefix, exact, expected):
    from megatron_patch.data.preprocess import main as preprocess_main

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "corpus.bin"  # a jsonl named as the output would be
    source.write_text(json.dumps({"text": "hello world"}) + "\n")
    argv = ["--input", str(source), "--output-prefix", prefix, "--tokenizer", str(tokenizer),
            "--overwrite"] + (["--exact-prefix"] if exact else [])
    refused(preprocess_main(argv), capsys, expected)
    assert source.read_text() == json.dumps({"text": "hello world"}) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin"]


def test_vocab_extension_refuses_an_empty_save(make_hf, user_dir, capsys):
    from megatron_patch.data.vocab_extension import main as vocab_main

    (user_dir / "corpus.txt").write_text("some text\n")
    code = vocab_main(["--corpus", "corpus.txt", "--load", make_hf("paths"), "--save", "", "--overwrite",
                       "--vocab-size", "100"])
    refused(code, capsys, "--save is empty")


def test_vocab_extension_refuses_a_save_holding_the_corpus(make_hf, tmp_path, capsys):
    from megatron_patch.data.vocab_extension import main as vocab_main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "corpus.txt").write_text("some text\n")
    code = vocab_main(["--corpus", str(tmp_path / "out" / "corpus.txt"), "--load", make_hf("paths"),
                       "--save", str(tmp_path / "out"), "--overwrite", "--vocab-size", "100"])
    refused(code, capsys, "contains --corpus")
    assert (tmp_path / "out" / "corpus.txt").is_file()


@pytest.mark.parametrize("flag", ["save", "tensorboard_dir", "data_cache_path"])
def test_training_refuses_empty_output_dirs(flag):
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig.from_dict(dict(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="tok",
                                     data_path=["d"], train_iters=1, **{flag: ""}))
    TALLY["tried"] += 1
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} is empty"):
        cfg.validate(1)
    TALLY["refused cleanly"] += 1


def test_generation_refuses_an_empty_output_file(tmp_path, capsys):
    from megatron_patch.generate import main as generate_main

    (tmp_path / "p.txt").write_text("hi\n")
    code = generate_main(["--load", str(tmp_path / "ckpt"), "--seq-length", "64", "--out-seq-length", "4",
                          "--text-generate-input-file", str(tmp_path / "p.txt"), "--text-generate-output-file", ""])
    refused(code, capsys, "--text-generate-output-file is empty")

