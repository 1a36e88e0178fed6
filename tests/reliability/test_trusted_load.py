"""A crafted torch_dist checkpoint must not run code in any tool that loads one (issue 13, item 1).

Two payloads, each a real checkpoint with one extra object that runs ``os.system`` when unpickled without
restriction: one inside ``.metadata`` (read by plain ``pickle.load``), one as a ``ShardedObject`` byte item (read by
``torch.load(weights_only=False)``). Every loading tool must refuse with one line and leave no marker.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patch.checkpoint import check_torch_dist_checkpoint
from megatron_patch.errors import CheckpointError

from .conftest import without_manifests

ROOT = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant_in_metadata(iter_dir: Path, marker: Path) -> None:
    path = iter_dir / ".metadata"
    with open(path, "rb") as handle:
        metadata = pickle.load(handle)
    metadata.planner_data = _RunsCode(f"touch {marker}")  # rides along; the rest stays a valid checkpoint
    with open(path, "wb") as handle:
        pickle.dump(metadata, handle)


def _plant_in_byte_item(iter_dir: Path, marker: Path) -> None:
    """Point the first byte item at a torch.save'd payload appended to its .distcp file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = iter_dir / ".metadata"
    with open(path, "rb") as handle:
        metadata = pickle.load(handle)
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    index = next(i for i in metadata.storage_data if i.fqn in byte_keys)
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save(_RunsCode(f"touch {marker}"), payload)
    data_file = iter_dir / info.relative_path
    info.offset, info.length = data_file.stat().st_size, len(payload.getvalue())
    with open(data_file, "ab") as handle:
        handle.write(payload.getvalue())
    with open(path, "wb") as handle:
        pickle.dump(metadata, handle)


PLANTS = {"metadata": _plant_in_metadata, "byte-item": _plant_in_byte_item}


@pytest.fixture(scope="module")
def clean_checkpoint(make_hf, tmp_path_factory):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("trusted")
    hf_to_mcore(make_hf("gqa_untied"), root / "mcore")
    return without_manifests(root / "mcore")


def _crafted(clean: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    ckpt = tmp_path / "crafted"
    shutil.copytree(clean, ckpt)
    marker = tmp_path / "PWNED"
    PLANTS[where](ckpt / "release", marker)
    return ckpt, marker


def test_clean_checkpoint_passes(clean_checkpoint):
    check_torch_dist_checkpoint(clean_checkpoint / "release")


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_payload_is_refused_without_running(clean_checkpoint, tmp_path, where):
    ckpt, marker = _crafted(clean_checkpoint, tmp_path, where)
    with pytest.raises(CheckpointError, match="refusing to load"):
        check_torch_dist_checkpoint(ckpt / "release")
    assert not marker.exists()
    # The payload is live: an unrestricted load (what megatron-core does) runs it.
    if where == "metadata":
        with open(ckpt / "release" / ".metadata", "rb") as handle:
            pickle.load(handle)
        assert marker.exists()


def test_garbage_metadata_is_one_line(clean_checkpoint, tmp_path):
    ckpt = tmp_path / "garbage"
    shutil.copytree(clean_checkpoint, ckpt)
    (ckpt / "release" / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check_torch_dist_checkpoint(ckpt / "release")


def _tool_commands(ckpt: Path, tmp_path: Path, hf_dir: str) -> dict[str, list[str]]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    data_prefix = tmp_path / "unused_text_document"
    return {
        "mcore2hf": ["-m", "megatron_patch.convert", "mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")],
        "verify": ["-m", "megatron_patch.convert", "verify", "--hf", hf_dir, "--mcore", str(ckpt)],
        "generate": ["-m", "megatron_patch.generate", "--load", str(ckpt), "--seq-length", "64",
                     "--out-seq-length", "4", "--text-generate-input-file", str(prompts),
                     "--text-generate-output-file", str(tmp_path / "out.jsonl")],
        "train": ["-m", "megatron_patch.train", "pretrain", "--load", str(ckpt), "--data-path", str(data_prefix),
                  "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length", "32", "--train-iters", "1",
                  "--lr", "1e-4", "--save", str(tmp_path / "run")],
    }


@pytest.mark.parametrize("tool", ["mcore2hf", "verify", "generate", "train"])
def test_every_loading_tool_refuses_a_crafted_checkpoint(clean_checkpoint, make_hf, tmp_path, tool):
    ckpt, marker = _crafted(clean_checkpoint, tmp_path, "metadata")
    if tool == "train":  # pretraining needs a dataset before it loads: build the shipped corpus
        from megatron_patch.data.indexed import build_indexed_dataset
        from megatron_patch.models.tiny import CORPUS

        jsonl = tmp_path / "corpus.jsonl"
        jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS.read_text().splitlines()
                                 if line.strip()))
        build_indexed_dataset(str(jsonl), tmp_path / "unused_text_document", make_hf("gqa_untied"), progress=False)
    command = _tool_commands(ckpt, tmp_path, make_hf("gqa_untied"))[tool]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    assert not marker.exists(), f"{tool} ran the planted payload"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "refusing to load" in errors[0], result.stderr[-3000:]


def test_every_megatron_core_load_is_vetted_first():
    """Each module that hands a directory to ``dist_checkpointing.load`` runs the check just before (a new loader
    that forgets it fails here, not in a user's cluster)."""
    import re

    package = ROOT / "megatron_patch"
    for path in package.rglob("*.py"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.search(r"dist_checkpointing\.load\(", line) and not line.lstrip().startswith(("#", '"', "``")):
                window = "\n".join(lines[max(0, number - 3):number])
                assert "check_torch_dist_checkpoint(" in window, f"{path}:{number + 1} loads without the check"
