"""Bad input: one-line error, non-zero exit, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_patch.convert.__main__ import main


@pytest.fixture(scope="module")
def sharded_hf(make_hf, tmp_path_factory):
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import make_hf_checkpoint

    path = tmp_path_factory.mktemp("sharded_hf")
    make_hf_checkpoint(path, get_family("llama").flavor("tiny"), max_shard_size="400KB", tokenizer=False)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _copy(src, tmp_path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def _run_hf2mcore(capsys, hf_dir, out_dir, *extra):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(["hf2mcore", "--load", str(hf_dir), "--save", str(out_dir), "--format", "legacy", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_clean_failure(rc, err, out_dir, *needles):
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not Path(out_dir).exists()
    assert not list(Path(out_dir).parent.glob(f".{Path(out_dir).name}.tmp-*"))


def test_missing_shard(sharded_hf, tmp_path, capsys):
    hf = _copy(sharded_hf, tmp_path)
    victim = sorted(hf.glob("model-*.safetensors"))[1]
    victim.unlink()
    rc, err = _run_hf2mcore(capsys, hf, tmp_path / "out")
    _assert_clean_failure(rc, err, tmp_path / "out", victim.name, "missing")


def test_truncated_shard(sharded_hf, tmp_path, capsys):
    hf = _copy(sharded_hf, tmp_path)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    rc, err = _run_hf2mcore(capsys, hf, tmp_path / "out")
    _assert_clean_failure(rc, err, tmp_path / "out", victim.name)


@pytest.mark.parametrize("key,value,needle", [
    ("intermediate_size", 256, "does not match the weights"),
    ("num_hidden_layers", 2, "does not account for"),
    ("num_hidden_layers", 6, "has no tensor"),
])
def test_config_does_not_match_weights(make_hf, tmp_path, capsys, key, value, needle):
    hf = _copy(make_hf("gqa_untied"), tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config[key] = value
    (hf / "config.json").write_text(json.dumps(config))
    rc, err = _run_hf2mcore(capsys, hf, tmp_path / "out")
    _assert_clean_failure(rc, err, tmp_path / "out", needle)


@pytest.mark.parametrize("tp,pp,needle", [
    (3, 1, "does not divide the 8 attention heads"),
    (8, 1, "does not divide the 4 key/value groups"),
    (1, 8, "larger than the number of layers"),
    (1, 3, "does not divide the 4 layers"),
])
def test_parallel_sizes_that_do_not_fit(make_hf, tmp_path, capsys, tp, pp, needle):
    rc, err = _run_hf2mcore(capsys, make_hf("gqa_untied"), tmp_path / "out", "--tp", str(tp), "--pp", str(pp))
    _assert_clean_failure(rc, err, tmp_path / "out", needle)


def test_unsupported_architecture_names_supported_ones(make_hf, tmp_path, capsys):
    hf = _copy(make_hf("gqa_untied"), tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (hf / "config.json").write_text(json.dumps(config))
    rc, err = _run_hf2mcore(capsys, hf, tmp_path / "out")
    _assert_clean_failure(rc, err, tmp_path / "out", "unsupported architecture", "LlamaForCausalLM")


def test_existing_output_needs_overwrite(make_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc, err = _run_hf2mcore(capsys, make_hf("gqa_untied"), out)
    assert rc != 0 and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc, _ = _run_hf2mcore(capsys, make_hf("gqa_untied"), out, "--overwrite")
    assert rc == 0 and (out / "latest_checkpointed_iteration.txt").is_file() and not (out / "keep.txt").exists()


def test_not_a_megatron_checkpoint(tmp_path, capsys):
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    rc = main(["mcore2hf", "--load", str(tmp_path / "empty"), "--save", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    _assert_clean_failure(rc, err, tmp_path / "hf", "not a Megatron checkpoint")


def test_unsupported_megatron_core_version(monkeypatch):
    from megatron_patch.errors import UnsupportedVersionError
    from megatron_patch.runtime import versions

    monkeypatch.setattr(versions, "megatron_core_version", lambda: "0.14.0")
    with pytest.raises(UnsupportedVersionError, match="supports 0.16.x"):
        versions.check_megatron_version()
    monkeypatch.undo()
    assert versions.check_megatron_version().startswith("0.16.")


def test_verify_names_trust_remote_code_for_remote_code_models(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BaichuanForCausalLM"],
                                                             "model_type": "baichuan"}))
    from megatron_patch.convert.verify import hf_logits

    with pytest.raises(ValueError, match="--trust-remote-code"):
        hf_logits(tmp_path / "hf", torch.zeros(1, 2, dtype=torch.long))


def test_negative_extra_vocab_is_one_line(make_hf, tmp_path, capsys):
    rc, err = _run_hf2mcore(capsys, make_hf("gqa_untied"), tmp_path / "out", "--extra-vocab-size", "-1")
    _assert_clean_failure(rc, err, tmp_path / "out", "--extra-vocab-size must be >= 0 (got -1)")


def test_a_bug_keeps_its_traceback(make_hf, tmp_path, monkeypatch):
    """Only our error classes (and the OS's path errors) become one line; a RuntimeError from a bug propagates."""
    from megatron_patch.convert import hf_to_mcore as module

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(module, "hf_to_mcore", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["hf2mcore", "--load", str(make_hf("gqa_untied")), "--save", str(tmp_path / "out")])
