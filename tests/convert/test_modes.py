"""Outputs written through a temporary name get the modes the umask gives, as a plain mkdir / open would."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_output_dir_honours_umask(tmp_path, umask):
    from megatron_patch.checkpoint.atomic import atomic_output_dir

    out = tmp_path / "ckpt"
    with atomic_output_dir(out) as temp:
        (temp / "release").mkdir()
        fd, private = tempfile.mkstemp(dir=temp / "release")  # 0600, as safetensors / mkstemp writers leave it
        os.close(fd)
        os.rename(private, temp / "release" / "model.safetensors")
        (temp / "tracker.txt").write_text("release")
    assert mode(out) == mode(out / "release") == 0o777 & ~umask
    assert mode(out / "release" / "model.safetensors") == mode(out / "tracker.txt") == 0o666 & ~umask


def test_generation_output_honours_umask(tmp_path, umask):
    from megatron_patch.generation.prompts import write_jsonl_atomic

    write_jsonl_atomic(tmp_path / "out.jsonl", [{"prompt": "a", "completion": "b"}])
    assert mode(tmp_path / "out.jsonl") == 0o666 & ~umask
