"""Outputs that overlap inputs are refused before any work (issue 13, item 2)."""

from __future__ import annotations

import os

import pytest

from megatron_patch.checkpoint.paths import OverlappingPathsError, check_disjoint
from megatron_patch.convert.__main__ import main as convert_main


@pytest.mark.parametrize("target", ["in", "in/sub", "."])
def test_overlap_is_refused(tmp_path, target):
    (tmp_path / "in").mkdir()
    with pytest.raises(OverlappingPathsError, match="--save"):
        check_disjoint(tmp_path / "in", tmp_path / target, "--load", "--save")


def test_symlink_to_the_input_is_the_input(tmp_path):
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "link")
    with pytest.raises(OverlappingPathsError, match="same path"):
        check_disjoint(tmp_path / "in", tmp_path / "link", "--load", "--save")


def test_siblings_are_fine(tmp_path):
    check_disjoint(tmp_path / "in", tmp_path / "input-copy", "--load", "--save")


@pytest.mark.parametrize("command", ["hf2mcore", "mcore2hf"])
def test_convert_with_save_equal_to_load_keeps_the_input(tmp_path, capsys, command):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    code = convert_main([command, "--load", str(source), "--save", str(source), "--overwrite"])
    assert code == 1
    assert "is the same path as --load" in capsys.readouterr().err
    assert (source / "config.json").read_text() == "{}"


def test_generate_refuses_to_overwrite_its_prompts(tmp_path, capsys):
    from megatron_patch.generate import main as generate_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    code = generate_main(["--load", str(tmp_path / "ckpt"), "--seq-length", "64", "--out-seq-length", "4",
                          "--text-generate-input-file", str(prompts), "--text-generate-output-file", str(prompts)])
    assert code == 1
    assert "--text-generate-output-file" in capsys.readouterr().err
    assert prompts.read_text() == "hello\n"
