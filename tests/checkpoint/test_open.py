"""The format registry and ``Checkpoint.open``: one lookup for formats, one validated read of the metadata, and a
one-line error naming the file for every kind of damage."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_patch.checkpoint.formats import CheckpointFormat, format_names, get_format, register_format
from megatron_patch.checkpoint.megatron import META, TRACKER
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.errors import CheckpointError
from megatron_patch.models.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def converted(make_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("open") / "mc"
    hf_to_mcore(make_hf("gqa_untied"), out, tp=2, pp=1, fmt="legacy")
    (out / "release" / "checksums.json").unlink()  # the cases edit the metadata: the checks behind the checksum
    return out


@pytest.fixture
def copy(converted, tmp_path):
    target = tmp_path / "mc"
    shutil.copytree(converted, target)
    return target


def test_open_resolves_tracker_meta_and_spec(converted):
    ckpt = Checkpoint.open(converted)
    assert ckpt.iter_dir == converted / "release" and ckpt.format is get_format("legacy")
    assert (ckpt.tp, ckpt.pp, ckpt.spec.family.name) == (2, 1, "llama")
    assert ckpt.spec.padded_vocab_size == ckpt.meta["padded_vocab_size"] == 2048  # 2000 padded to 128 x TP=2
    assert ckpt.assets_dir == converted / "release" / "hf_assets"
    assert Checkpoint.open(converted / "release").meta == ckpt.meta  # an iteration directory opens the same


def test_registry_lists_formats_and_refuses_doubles():
    assert format_names() == ["legacy", "torch_dist"]
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format 'zarr' \(known: legacy, torch_dist\)"):
        get_format("zarr")
    with pytest.raises(ValueError, match="'legacy' is registered twice"):
        register_format("legacy")(type("Again", (CheckpointFormat,), {}))


def test_cli_format_choices_are_the_registered_formats():
    from megatron_patch.convert.__main__ import FORMAT_CHOICES

    assert sorted(FORMAT_CHOICES) == format_names()


def _edit_meta(root, **changes):
    path = root / "release" / META
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"format": "zarr"}, "unknown checkpoint format 'zarr'"),
    ({"padded_vocab_size": None, "family": None}, "lacks family, padded_vocab_size"),
    ({"tensor_model_parallel_size": "2"}, "'tensor_model_parallel_size' must be a JSON int"),
    ({"dtype": "float33"}, "'dtype' 'float33' is not a floating-point torch dtype"),
    ({"family": "gpt5"}, "unknown model family 'gpt5'"),
])
def test_bad_metadata_is_refused_naming_the_file(copy, changes, message):
    path = _edit_meta(copy, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        Checkpoint.open(copy)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_metadata_that_is_not_json(copy):
    (copy / "release" / META).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{copy / 'release' / META} is not valid JSON"):
        Checkpoint.open(copy)


@pytest.mark.parametrize("tracker,message", [
    ("banana", "holds 'banana'; expected 'release' or an iteration number"),
    ("-3", "holds '-3'"),
    ("7", "names iter_0000007, but"),
])
def test_bad_tracker_is_refused_naming_the_file(copy, tracker, message):
    (copy / TRACKER).write_text(tracker)
    with pytest.raises(CheckpointError, match=message) as error:
        Checkpoint.open(copy)
    assert str(copy) in str(error.value)
