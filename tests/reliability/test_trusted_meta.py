"""Metadata and numbers that were used as given: each is now checked against its type, range and the tensors
(issue 23, items 3, 5, 6 and 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.errors import CheckpointError

from .conftest import TALLY, refused


def edit_meta(ckpt: Path, **changes) -> None:
    path = ckpt / "release" / "megatron_patch.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("hf_"):
            meta["hf_config"][key[3:]] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("changes,expected", [
    (dict(vocab_size=-5), "'vocab_size' must be >= 1 (got -5)"),
    (dict(make_vocab_size_divisible_by=0), "'make_vocab_size_divisible_by' must be >= 1 (got 0)"),
    (dict(tensor_model_parallel_size=0), "'tensor_model_parallel_size' must be >= 1"),
    (dict(extra_vocab_size=-1), "'extra_vocab_size' must be >= 0"),
    (dict(vocab_size=1000), "'vocab_size' 1000 is not the HF config's"),
    (dict(dtype="int8"), "'dtype' 'int8' is not a floating-point torch dtype"),
    (dict(dtype="float16"), "is stored as torch.float32, but megatron_patch.json says torch.float16"),
])
def test_mcore2hf_refuses_meta_out_of_range(ckpt, tmp_path, capsys, changes, expected):
    edit_meta(ckpt, **changes)
    refused(convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")]), capsys, expected)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("where", ["training", "generation"])
def test_a_huge_recorded_size_is_refused_before_a_model_is_built(ckpt, where):
    """hidden_size 10^6 in the HF config of megatron_patch.json: refused against the stored shapes (headers only)
    before training or generation builds a model of that size."""
    edit_meta(ckpt, hf_hidden_size=10**6)
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="has shape .*; its recorded configuration implies"):
        if where == "training":
            from megatron_patch.checkpoint.megatron import find_iteration_dir
            from megatron_patch.training.arguments import TrainConfig
            from megatron_patch.training.setup import resolve_model_source

            cfg = TrainConfig.from_dict(dict(mode="pretrain", load=str(ckpt), data_path=["d"], train_iters=1))
            resolve_model_source(cfg, find_iteration_dir(ckpt))
        else:
            from megatron_patch.generation.checks import check_stored_tensors

            check_stored_tensors(ckpt / "release")
    TALLY["refused cleanly"] += 1


@pytest.fixture
def hf_copy(make_hf, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(make_hf("reliability-shared"), copy)
    return copy


def test_an_index_that_lists_part_of_the_tensors_is_refused(hf_copy, tmp_path, capsys):
    names = sorted(load_file(hf_copy / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names[:-2]}}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code = convert_main(["hf2mcore", "--load", str(hf_copy), "--save", str(tmp_path / "out")])
    refused(code, capsys, "does not list 2 stored tensor(s)")


def test_a_mixed_dtype_checkpoint_is_converted_with_a_warning(hf_copy, tmp_path, capsys):
    tensors = load_file(hf_copy / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].half()
    save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
    TALLY["tried"] += 1
    assert convert_main(["hf2mcore", "--load", str(hf_copy), "--save", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"mixes dtypes: 1 tensor(s) are float16 (e.g. '{name}'), the rest float32" in err, err
    TALLY["refused cleanly"] += 1  # said, not silent


@pytest.mark.parametrize("argv,expected", [
    (["verify", "--tolerance", "nan"], "--tolerance must be a finite number >= 0 (got nan)"),
    (["verify", "--tolerance", "-1"], "--tolerance must be a finite number >= 0 (got -1.0)"),
    (["mcore2hf", "--max-shard-size-gb", "0"], "--max-shard-size-gb must be a finite number > 0 (got 0.0)"),
    (["mcore2hf", "--max-shard-size-gb", "-1"], "--max-shard-size-gb must be a finite number > 0"),
    (["mcore2hf", "--max-shard-size-gb", "nan"], "--max-shard-size-gb must be a finite number > 0 (got nan)"),
    (["hf2mcore", "--tp", "0"], "--tp and --pp must be >= 1 (got 0, 1)"),
    (["hf2mcore", "--extra-vocab-size", "100000000000"], "--extra-vocab-size must be <= 4194304"),
])
def test_converter_numbers(converted, make_hf, tmp_path, capsys, argv, expected):
    hf = make_hf("reliability-shared")
    paths = {"verify": ["--hf", hf, "--mcore", str(converted)],
             "mcore2hf": ["--load", str(converted), "--save", str(tmp_path / "out")],
             "hf2mcore": ["--load", hf, "--save", str(tmp_path / "out")]}[argv[0]]
    refused(convert_main(argv[:1] + paths + argv[1:]), capsys, expected)


@pytest.mark.parametrize("flag", ["--temperature", "--repetition-penalty"])
def test_generation_refuses_nan_sampling(tmp_path, capsys, flag):
    from megatron_patch.generate import main as generate_main

    (tmp_path / "p.txt").write_text("hi\n")
    code = generate_main(["--load", str(tmp_path / "ckpt"), "--seq-length", "64", "--out-seq-length", "4",
                          "--text-generate-input-file", str(tmp_path / "p.txt"), "--top-k", "0", flag, "nan",
                          "--text-generate-output-file", str(tmp_path / "o.jsonl")])
    refused(code, capsys, f"{flag} must be a finite number (got nan)")



def test_an_object_item_the_format_never_holds_is_refused(ckpt, tmp_path, capsys):
    """A byte item that is no layer's _extra_state (its bytes a valid pickle of plain data): exported with exit 0."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path = ckpt / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    first = next(info for index, info in metadata.storage_data.items()
                 if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
    metadata.state_dict_metadata["launch_command"] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex("launch_command")] = first
    path.write_bytes(pickle.dumps(metadata))
    code = convert_main(["mcore2hf", "--load", str(ckpt), "--save", str(tmp_path / "hf")])
    refused(code, capsys, "holds object item 'launch_command', which a model checkpoint never does")
