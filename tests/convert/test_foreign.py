"""mcore2hf on checkpoints this toolkit did not write: Megatron-LM (legacy rank files with ``args``; torch_dist with
``common.pt``) and Megatron-Bridge (torch_dist with ``run_config.yaml``). Each is built here from one of ours: the
tensors are the same, only our ``megatron_patch.json`` and ``hf_assets/`` are replaced by what those tools record."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from megatron_patch.checkpoint.hf import HFCheckpointReader
from megatron_patch.checkpoint.trusted_load import megatron_lm_args_globals
from megatron_patch.convert.__main__ import main
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.errors import CheckpointError

# llama "tiny": 4 layers, hidden 128, FFN 344, 8 heads, 4 key/value groups, head dim 16.
SHAPE = dict(num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=8, kv_channels=16)


def _megatron_lm_args(tp: int, pp: int, **changes) -> argparse.Namespace:
    from megatron.core.enums import Fp8Recipe, ModelType
    from megatron.core.transformer.enums import AttnBackend

    # Beside plain values a Megatron-LM run's args hold torch dtypes and megatron-core enum members.
    return argparse.Namespace(**{**SHAPE, "group_query_attention": True, "num_query_groups": 4,
                                 "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                 "make_vocab_size_divisible_by": 128, "untie_embeddings_and_output_weights": True,
                                 "padded_vocab_size": 2048, "swiglu": True, "params_dtype": torch.bfloat16,
                                 "attention_backend": AttnBackend.auto, "model_type": ModelType.encoder_or_decoder,
                                 "fp8_recipe": Fp8Recipe.delayed, **changes})


def _strip_ours(root):
    """Our checkpoint without what only this toolkit writes."""
    iter_dir = root / "release"
    (iter_dir / "megatron_patch.json").unlink()
    (iter_dir / "checksums.json").unlink()
    shutil.rmtree(iter_dir / "hf_assets")
    return iter_dir


def _assert_equal_to(hf_dir, out):
    original, back = HFCheckpointReader(hf_dir), HFCheckpointReader(out)
    assert sorted(original.names()) == sorted(back.names())
    for name in original.names():
        assert torch.equal(original.get(name), back.get(name)), name
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()  # from --hf-config


@pytest.fixture(scope="module")
def hf_dir(make_hf):
    return make_hf("gqa_untied")


def _megatron_lm_legacy(hf_dir, root, tp=2, pp=2, **arg_changes):
    hf_to_mcore(hf_dir, root, tp=tp, pp=pp, fmt="legacy")
    iter_dir = _strip_ours(root)
    for path in iter_dir.glob("mp_rank_*/model_optim_rng.pt"):
        with torch.serialization.safe_globals(megatron_lm_args_globals()):  # hf2mcore already wrote args
            payload = torch.load(path, weights_only=True)
        payload["args"] = _megatron_lm_args(tp, pp, **arg_changes)
        torch.save(payload, path)
    return root


def test_megatron_lm_legacy(hf_dir, tmp_path):
    root = _megatron_lm_legacy(hf_dir, tmp_path / "mlm")
    mcore_to_hf(root, tmp_path / "out", hf_config_dir=hf_dir, model_name="llama")
    _assert_equal_to(hf_dir, tmp_path / "out")


def test_megatron_lm_torch_dist(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "mlm", tp=2, pp=2, fmt="torch_dist")
    iter_dir = _strip_ours(tmp_path / "mlm")
    torch.save({"args": _megatron_lm_args(2, 2), "checkpoint_version": 3.0, "iteration": 0}, iter_dir / "common.pt")
    mcore_to_hf(tmp_path / "mlm", tmp_path / "out", hf_config_dir=hf_dir)  # family from config.json
    _assert_equal_to(hf_dir, tmp_path / "out")


def _bridge(hf_dir, root, **model_changes):
    import yaml

    hf_to_mcore(hf_dir, root, tp=1, pp=1, fmt="torch_dist")
    iter_dir = _strip_ours(root)
    model = {"_target_": "megatron.bridge.models.llama.LlamaModelProvider", **SHAPE, "num_query_groups": 4,
             "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "vocab_size": 2000,
             "share_embeddings_and_output_weights": False, **model_changes}
    (iter_dir / "run_config.yaml").write_text(yaml.safe_dump({"model": model, "train": {"train_iters": 10}}))
    return root


def test_megatron_bridge(hf_dir, tmp_path, capsys):
    root = _bridge(hf_dir, tmp_path / "bridge")
    rc = main(["mcore2hf", "--load", str(root), "--save", str(tmp_path / "out"), "--hf-config", str(hf_dir),
               "--model-name", "llama"])
    assert rc == 0, capsys.readouterr().err
    _assert_equal_to(hf_dir, tmp_path / "out")


def test_without_hf_config_the_error_names_the_flag(hf_dir, tmp_path, capsys):
    root = _bridge(hf_dir, tmp_path / "bridge")
    capsys.readouterr()
    rc = main(["mcore2hf", "--load", str(root), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert "Megatron-Bridge checkpoint without megatron_patch.json: pass --hf-config DIR" in err


def test_recorded_shape_must_match_the_hf_config(hf_dir, tmp_path):
    root = _bridge(hf_dir, tmp_path / "bridge", num_layers=6)
    with pytest.raises(CheckpointError, match="run_config.yaml records num_layers=6, but .*config.json gives "
                                              "num_layers=4"):
        mcore_to_hf(root, tmp_path / "out", hf_config_dir=hf_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_args_holding_other_objects_are_refused(hf_dir, tmp_path, fmt):
    """Only plain data, dtypes, the Namespace and megatron-core's enums unpickle: anything else stops the run."""
    import pathlib

    if fmt == "legacy":
        root = _megatron_lm_legacy(hf_dir, tmp_path / "mlm", tp=1, pp=1, data_path=pathlib.PurePosixPath("/d"))
    else:
        hf_to_mcore(hf_dir, tmp_path / "mlm", tp=1, pp=1, fmt="torch_dist")
        iter_dir = _strip_ours(tmp_path / "mlm")
        torch.save({"args": _megatron_lm_args(1, 1, data_path=pathlib.PurePosixPath("/d"))}, iter_dir / "common.pt")
        root = tmp_path / "mlm"
    with pytest.raises(CheckpointError, match="PurePosixPath"):
        mcore_to_hf(root, tmp_path / "out", hf_config_dir=hf_dir)
    assert not (tmp_path / "out").exists()


def test_legacy_without_args_is_refused(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "mlm", tp=1, pp=1, fmt="legacy")
    for path in _strip_ours(tmp_path / "mlm").glob("mp_rank_*/model_optim_rng.pt"):  # hf2mcore writes args: drop
        with torch.serialization.safe_globals(megatron_lm_args_globals()):
            payload = torch.load(path, weights_only=True)
        payload.pop("args")
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="model_optim_rng.pt has no 'args'"):
        mcore_to_hf(tmp_path / "mlm", tmp_path / "out", hf_config_dir=hf_dir)


def test_torch_dist_recording_nothing_is_refused(hf_dir, tmp_path):
    hf_to_mcore(hf_dir, tmp_path / "td", tp=1, pp=1, fmt="torch_dist")
    iter_dir = _strip_ours(tmp_path / "td")
    (iter_dir / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="nothing records which model it holds"):
        mcore_to_hf(tmp_path / "td", tmp_path / "out", hf_config_dir=hf_dir)
