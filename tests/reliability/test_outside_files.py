"""Paths a checkpoint names that lead outside it are refused, never read or copied (issue 23, item 2).

A crafted checkpoint may hold an ``hf_assets`` link to a folder of the user's (``~/.ssh``), a DCP ``.metadata`` whose
items point at ``../../elsewhere``, or a ``megatron_patch.json`` whose iteration is a path."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from megatron_patch.checkpoint.trusted_load import check_torch_dist_checkpoint
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.errors import CheckpointError

from .conftest import TALLY, refused


def link_assets_outside(ckpt: Path) -> None:
    assets = ckpt / "release" / "hf_assets"
    shutil.rmtree(assets)
    os.symlink(ckpt.parent / "secrets", assets)


def test_mcore2hf_does_not_follow_hf_assets_out_of_the_checkpoint(ckpt, tmp_path, capsys):
    link_assets_outside(ckpt)
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")])
    refused(code, capsys, "outside")
    assert not (tmp_path / "hf").exists()


def test_training_refuses_hf_assets_out_of_its_load(ckpt):
    """Training copies --load's hf_assets into every checkpoint it saves: refused when the run is set up."""
    from megatron_patch.checkpoint.megatron import find_iteration_dir
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.setup import resolve_model_source

    link_assets_outside(ckpt)
    cfg = TrainConfig.from_dict(dict(mode="pretrain", load=str(ckpt), data_path=["d"], train_iters=1))
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="hf_assets leads to .*secrets, outside"):
        resolve_model_source(cfg, find_iteration_dir(ckpt))
    TALLY["refused cleanly"] += 1


def test_training_save_copies_nothing_from_outside(ckpt, tmp_path):
    """The save path itself (a source whose assets became a link after the run started)."""
    from types import SimpleNamespace

    from megatron_patch.checkpoint.hf import copy_assets
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.training.checkpointing import source_assets_root

    opened = Checkpoint.open(ckpt)
    link_assets_outside(ckpt)
    source = SimpleNamespace(checkpoint=opened, assets_dir=opened.assets_dir)
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="outside"):
        copy_assets(source.assets_dir, tmp_path / "out", source_assets_root(source))
    assert not list((tmp_path / "out").glob("*"))
    TALLY["refused cleanly"] += 1


def test_generation_check_refuses_hf_assets_out_of_the_checkpoint(ckpt, tmp_path, capsys):
    from megatron_patch.generate import main as generate_main

    link_assets_outside(ckpt)
    (tmp_path / "p.txt").write_text("hi\n")
    code = generate_main(["--load", str(ckpt), "--seq-length", "64", "--out-seq-length", "4", "--check-only",
                          "--text-generate-input-file", str(tmp_path / "p.txt"),
                          "--text-generate-output-file", str(tmp_path / "out.jsonl")])
    refused(code, capsys, "outside")


def point_items_outside(ckpt: Path, kind: str) -> None:
    """Move the data file out of the checkpoint and make the ``kind`` items of ``.metadata`` name it there."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    release = ckpt / "release"
    elsewhere = ckpt.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(release / "__0_0.distcp", elsewhere / "x.distcp")
    metadata = pickle.loads((release / ".metadata").read_bytes())
    wanted = TensorStorageMetadata if kind == "tensor" else BytesStorageMetadata
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], wanted):
            info.relative_path = "../../elsewhere/x.distcp"
    (release / ".metadata").write_bytes(pickle.dumps(metadata))


def test_mcore2hf_refuses_tensor_items_outside_the_checkpoint(ckpt, tmp_path, capsys):
    point_items_outside(ckpt, "tensor")
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")])
    refused(code, capsys, "names data file '../../elsewhere/x.distcp' outside")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["tensor", "bytes"])
def test_the_load_check_refuses_items_outside_the_checkpoint(ckpt, kind):
    """What training, generation and the reward model run before megatron-core reads a torch_dist directory."""
    point_items_outside(ckpt, kind)
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="outside"):
        check_torch_dist_checkpoint(ckpt / "release")
    TALLY["refused cleanly"] += 1


@pytest.mark.parametrize("iteration", ["../../elsewhere", -3, 1.5, True])
def test_meta_iteration_must_be_release_or_a_number(ckpt, tmp_path, capsys, iteration):
    path = ckpt / "release" / "megatron_patch.json"
    meta = json.loads(path.read_text())
    meta["iteration"] = iteration
    path.write_text(json.dumps(meta))
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")])
    refused(code, capsys, "'iteration' must be 'release' or an iteration number")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_train_check_refuses_a_metadata_payload(ckpt):
    """``train check`` runs the same vetting as the ranks (it passed a payload the run then refused)."""
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.preflight import preflight

    metadata = pickle.loads((ckpt / "release" / ".metadata").read_bytes())
    metadata.planner_data = _Payload()
    (ckpt / "release" / ".metadata").write_bytes(pickle.dumps(metadata))
    cfg = TrainConfig.from_dict(dict(mode="pretrain", load=str(ckpt), data_path=["d"], train_iters=1))
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="names 'posix.system'"):
        preflight(cfg, 1)
    TALLY["refused cleanly"] += 1
