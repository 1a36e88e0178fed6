"""Bit flips are caught (issue 23, item 8): every checkpoint this toolkit writes carries ``checksums.json``, and a
byte flipped in the middle of a weight file is refused on load in one line naming the file, unless
``--no-verify-checksums``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.checkpoint import checksums
from megatron_patch.checkpoint.checksums import MANIFEST, verify_manifest, write_manifest
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.errors import CheckpointError

from .conftest import refused


@pytest.fixture(scope="module")
def written(make_hf, tmp_path_factory):
    """A tiny HF llama converted to torch_dist, with its manifest (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("checksums") / "ckpt"
    assert convert_main(["hf2mcore", "--load", make_hf("reliability-shared"), "--save", str(out)]) == 0
    return out


@pytest.fixture
def ckpt(written, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(written, copy)
    return copy


@pytest.fixture(autouse=True)
def fresh_verification():
    """Each case starts with checking on and nothing remembered as already verified."""
    checksums._verified.clear()
    checksums.set_verification(True)
    yield
    checksums._verified.clear()
    checksums.set_verification(True)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_written_file_is_listed_with_its_digest(written, tmp_path):
    """hf2mcore's manifest (digests taken while streaming) equals one computed from the files; mcore2hf's too."""
    iter_dir = written / "release"
    listed = json.loads((iter_dir / MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(iter_dir).as_posix() for p in iter_dir.rglob("*")
                     if p.is_file() and p.name != MANIFEST)
    assert sorted(listed) == on_disk and "__0_0.distcp" in listed
    for name, entry in listed.items():
        assert (entry["size"], entry[checksums.ALGORITHM]) == checksums.hash_file(iter_dir / name), name
    assert convert_main(["mcore2hf", "--load", str(written), "--save", str(tmp_path / "hf")]) == 0
    hf_listed = json.loads((tmp_path / "hf" / MANIFEST).read_text())["files"]
    assert "model.safetensors" in hf_listed and "config.json" in hf_listed
    assert verify_manifest(tmp_path / "hf")


def test_a_flipped_byte_in_a_distcp_is_refused(ckpt, tmp_path, capsys):
    flip_middle_byte(ckpt / "release" / "__0_0.distcp")
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")])
    refused(code, capsys, f"{ckpt / 'release' / '__0_0.distcp'} does not match its checksum")
    assert not (tmp_path / "hf").exists()
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf"), "--no-verify-checksums"])
    assert code == 0, capsys.readouterr().err  # the user's explicit choice: read as before


def test_a_flipped_byte_in_a_safetensors_shard_is_refused(written, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert convert_main(["mcore2hf", "--load", str(written), "--save", str(hf)]) == 0
    flip_middle_byte(hf / "model.safetensors")
    code = convert_main(["hf2mcore", "--load", str(hf), "--save", str(tmp_path / "back")])
    refused(code, capsys, f"{hf / 'model.safetensors'} does not match its checksum")
    assert not (tmp_path / "back").exists()


def test_a_flipped_byte_in_a_legacy_rank_file_is_refused(make_hf, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    assert convert_main(["hf2mcore", "--load", make_hf("reliability-shared"), "--save", str(legacy),
                         "--format", "legacy", "--tp", "2"]) == 0
    rank_file = legacy / "release" / "mp_rank_01" / "model_optim_rng.pt"
    flip_middle_byte(rank_file)
    code = convert_main(["mcore2hf", "--load", str(legacy), "--save", str(tmp_path / "hf")])
    refused(code, capsys, f"{rank_file} does not match its checksum")


def test_a_truncated_or_missing_file_and_a_bad_manifest_are_one_line(ckpt, tmp_path):
    iter_dir = ckpt / "release"
    shutil.copy(iter_dir / "common.pt", tmp_path / "common.pt")
    (iter_dir / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="common.pt is listed in .* but missing"):
        verify_manifest(iter_dir)
    shutil.copy(tmp_path / "common.pt", iter_dir / "common.pt")
    with open(iter_dir / "__0_0.distcp", "r+b") as file:
        file.truncate(100)
    with pytest.raises(CheckpointError, match="has 100 bytes, .* were written"):
        verify_manifest(iter_dir)
    manifest = json.loads((iter_dir / MANIFEST).read_text())
    manifest["files"]["../../secrets/id_rsa"] = {"size": 11, checksums.ALGORITHM: "0"}
    (iter_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="is not a file inside the checkpoint"):
        verify_manifest(iter_dir)
    (iter_dir / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*checksums.json"):
        verify_manifest(iter_dir)


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "buffered"])
def test_chunk_digests_taken_while_writing_are_those_of_the_file(tmp_path, monkeypatch, direct):
    """Chunks of 8 KiB (64 MiB in use), pieces crossing them; a flipped byte names its chunk's bytes."""
    from megatron_patch.checkpoint.bulk_file import BulkFile

    monkeypatch.setattr(checksums, "CHUNK_BYTES", 8192)
    monkeypatch.setenv("MEGATRON_PATCH_DIRECT_IO", direct)
    data = bytes(range(256)) * 115  # 29440 bytes: 3 whole chunks and a part
    with BulkFile(tmp_path / "weights.bin", stage_bytes=4096) as out:
        for start in range(0, len(data), 3000):
            out.write(data[start:start + 3000])
    write_manifest(tmp_path)
    digests = json.loads((tmp_path / MANIFEST).read_text())["files"]["weights.bin"][checksums.ALGORITHM]
    assert len(digests) == 4 and checksums.hash_file(tmp_path / "weights.bin") == (len(data), digests)
    assert verify_manifest(tmp_path)
    checksums._verified.clear()
    flip_middle_byte(tmp_path / "weights.bin")  # byte 14720: in the second chunk
    with pytest.raises(CheckpointError, match=r"weights.bin does not match its checksum .*\(bytes 8192-16384 changed"):
        verify_manifest(tmp_path)


def test_a_directory_without_a_manifest_is_read_as_before(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    assert verify_manifest(tmp_path) is False
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is True


@pytest.mark.parametrize("tool", ["generate", "train"])
def test_generation_and_training_refuse_a_flipped_byte(ckpt, make_hf, tmp_path, tool):
    """The launchers' own line (rank 0 checks under torchrun); nothing is generated or trained."""
    iter_dir = ckpt / "release"
    flip_middle_byte(iter_dir / "__0_0.distcp")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    commands = {
        "generate": ["-m", "megatron_patch.generate", "--load", str(ckpt), "--seq-length", "64", "--out-seq-length",
                     "4", "--text-generate-input-file", str(prompts), "--text-generate-output-file",
                     str(tmp_path / "out.jsonl")],
        "train": ["-m", "megatron_patch.train", "pretrain", "--load", str(ckpt), "--data-path",
                  str(tmp_path / "unused_text_document"), "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--seq-length", "32", "--train-iters", "1", "--lr", "1e-4", "--save", str(tmp_path / "run")],
    }
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, *commands[tool]], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and f"{iter_dir / '__0_0.distcp'} does not match its checksum" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "run" / "iter_0000001").exists()
