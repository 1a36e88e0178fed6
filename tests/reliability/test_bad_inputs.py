"""Bad inputs replayed through the converters (issue 13, items 3-5 and 7): each must be refused with one line,
exit 1, no traceback and nothing written. Each row is (case, how to damage the input, command, expected text of
the error line); the outcomes are tallied in ``conftest.TALLY``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.convert.__main__ import main as convert_main

from .conftest import TALLY, without_manifests


@pytest.fixture(scope="module")
def sources(make_hf, tmp_path_factory):
    """A tiny HF llama and its legacy (TP=2) and torch_dist conversions, shared read-only by every case."""
    root = tmp_path_factory.mktemp("sources")
    hf = Path(make_hf("reliability"))
    assert convert_main(["hf2mcore", "--load", str(hf), "--save", str(root / "legacy"), "--format", "legacy",
                         "--tp", "2"]) == 0
    assert convert_main(["hf2mcore", "--load", str(hf), "--save", str(root / "torch_dist")]) == 0
    without_manifests(root)
    return {"hf": hf, "legacy": root / "legacy", "torch_dist": root / "torch_dist"}


# --- damage -------------------------------------------------------------------------------------------------------

def load_rank_file(path: Path) -> dict:
    """A rank file as written: Megatron-LM's ``args`` namespace beside the model (plain values only)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def edit_rank(name, tensor, tp_rank=0):
    def damage(ckpt: Path):
        path = ckpt / "release" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"
        payload = load_rank_file(path)
        payload["model"][name] = tensor(payload["model"].get(name))
        torch.save(payload, path)
    return damage


def edit_meta(**hf_config):
    def damage(ckpt: Path):
        path = ckpt / "release" / "megatron_patch.json"
        meta = json.loads(path.read_text())
        meta["hf_config"].update(hf_config)
        path.write_text(json.dumps(meta))
    return damage


def edit_config(change):
    def damage(hf: Path):
        config = json.loads((hf / "config.json").read_text())
        change(config)
        (hf / "config.json").write_text(json.dumps(config))
    return damage


def poison_hf(value, name="model.layers.1.mlp.down_proj.weight"):
    def damage(hf: Path):
        tensors = load_file(hf / "model.safetensors")
        tensors[name][0, 0] = value
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    return damage


def write(relative, text):
    return lambda root: (root / relative).write_text(text)


def truncate(relative):
    def damage(root: Path):
        path = root / relative
        path.write_bytes(path.read_bytes()[:1000])
    return damage


def unlink(relative):
    return lambda root: (root / relative).unlink()


def symlink_outside(relative):
    def damage(root: Path):
        outside = root.parent / "outside.json"
        outside.write_text("{}")
        (root / relative).unlink()
        os.symlink(outside, root / relative)
    return damage


LEGACY_FC2 = "decoder.layers.0.mlp.linear_fc2.weight"

# (case, source, damage, command, extra flags, expected text in the one error line)
CASES = [
    # item 3: legacy checkpoints that disagree with themselves
    ("legacy-wrong-shape", "legacy", edit_rank(LEGACY_FC2, lambda t: torch.zeros(128, 100)), "mcore2hf", [],
     "has shape (128, 100); its recorded configuration implies (128, 172)"),
    ("legacy-extra-tensor", "legacy", edit_rank("decoder.layers.9.mlp.linear_fc2.weight", lambda t: torch.zeros(3)),
     "mcore2hf", [], "holds tensors its recorded configuration does not have: decoder.layers.9"),
    ("legacy-missing-tensor", "legacy", lambda c: None, "mcore2hf", [], None),  # replaced below
    ("legacy-int-weight", "legacy", edit_rank(LEGACY_FC2, lambda t: t.to(torch.int32)), "mcore2hf", [],
     "is torch.int32; a weight must be a floating-point tensor"),
    ("legacy-meta-fewer-layers", "legacy", edit_meta(num_hidden_layers=3), "mcore2hf", [],
     "holds tensors its recorded configuration does not have: decoder.layers.3"),
    ("legacy-meta-hidden", "legacy", edit_meta(intermediate_size=300), "mcore2hf", [],
     "its recorded configuration implies (300, 128)"),
    ("torch_dist-meta-fewer-layers", "torch_dist", edit_meta(num_hidden_layers=3), "mcore2hf", [],
     "has shape (4, 128); its recorded configuration implies (3, 128)"),
    ("torch_dist-meta-tied", "torch_dist", edit_meta(tie_word_embeddings=True), "mcore2hf", [],
     "holds tensors its recorded configuration does not have: output_layer.weight"),
    # item 4: non-finite weights
    ("hf-nan-torch_dist", "hf", poison_hf(float("nan")), "hf2mcore", [],
     "tensor 'decoder.layers.1.mlp.linear_fc2.weight (from model.layers.1.mlp.down_proj.weight)' holds 1 NaN"),
    # torch_dist stores SwiGLU's gate and up halves straight from the HF files: each is checked on its way
    ("hf-nan-gate-torch_dist", "hf", poison_hf(float("nan"), "model.layers.1.mlp.up_proj.weight"), "hf2mcore", [],
     "tensor 'decoder.layers.1.mlp.linear_fc1.weight (from model.layers.1.mlp.gate_proj.weight, "
     "model.layers.1.mlp.up_proj.weight)' holds 1 NaN"),
    ("hf-inf-legacy", "hf", poison_hf(float("inf")), "hf2mcore", ["--format", "legacy", "--tp", "2"],
     "holds 0 NaN and 1 Inf values (pass --allow-non-finite"),
    ("legacy-nan", "legacy", edit_rank(LEGACY_FC2, lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))),
     "mcore2hf", [], "tensor 'model.layers.0.mlp.down_proj.weight' holds 128 NaN"),
    # item 5 / 7: one line instead of a traceback
    ("config-not-object", "hf", write("config.json", "[1]"), "hf2mcore", [], "must hold a JSON object"),
    ("config-missing-field", "hf", edit_config(lambda c: c.pop("hidden_size")), "hf2mcore", [],
     "config.json has no field 'hidden_size'"),
    ("index-without-weight-map", "hf", write("model.safetensors.index.json", "{}"), "hf2mcore", [],
     "has no 'weight_map'"),
    ("index-outside-model-dir", "hf",
     write("model.safetensors.index.json", json.dumps({"weight_map": {"x": "../other/model.safetensors"}})),
     "hf2mcore", [], "outside"),
    ("vocab-divisible-by-0", "hf", None, "hf2mcore", ["--make-vocab-size-divisible-by", "0"],
     "--make-vocab-size-divisible-by must be >= 1"),
    ("symlinked-asset", "hf", symlink_outside("tokenizer_config.json"), "hf2mcore", [], "outside"),
    ("missing-distcp", "torch_dist", unlink("release/__0_0.distcp"), "mcore2hf", [], "data file __0_0.distcp is missing"),
    ("truncated-distcp", "torch_dist", truncate("release/__0_0.distcp"), "mcore2hf", [], "data file __0_0.distcp is truncated"),
    ("garbage-tracker", "torch_dist", write("latest_checkpointed_iteration.txt", "garbage"), "mcore2hf", [],
     "latest_checkpointed_iteration.txt holds 'garbage'"),
    ("bad-meta-json", "torch_dist", write("release/megatron_patch.json", "{bad"), "mcore2hf", [],
     "megatron_patch.json is not valid JSON"),
    ("unknown-format", "torch_dist", lambda c: edit_meta_field(c, "format", "foo"), "mcore2hf", [],
     "megatron_patch.json: unknown checkpoint format 'foo'"),
]
CASES[2] = ("legacy-missing-tensor", "legacy", lambda c: drop_rank_tensor(c, LEGACY_FC2), "mcore2hf", [],
            f"lacks tensors its recorded configuration needs: {LEGACY_FC2}")


def drop_rank_tensor(ckpt: Path, name: str):
    path = ckpt / "release" / "mp_rank_01" / "model_optim_rng.pt"
    payload = load_rank_file(path)
    del payload["model"][name]
    torch.save(payload, path)


def edit_meta_field(ckpt: Path, key, value):
    path = ckpt / "release" / "megatron_patch.json"
    meta = json.loads(path.read_text())
    meta[key] = value
    path.write_text(json.dumps(meta))


def replay(capsys, argv, out: Path) -> tuple[int | None, str]:
    """Run a command in-process; return (exit code or None for a traceback, stderr) and tally the outcome."""
    TALLY["tried"] += 1
    capsys.readouterr()
    try:
        code = convert_main(argv)
    except BaseException:  # noqa: BLE001 - a traceback is an outcome to count
        TALLY["tracebacks"] += 1
        raise
    err = capsys.readouterr().err.strip()
    partial = out.exists() or any(out.parent.glob(f".{out.name}.tmp-*"))
    if partial:
        TALLY["partial outputs"] += 1
    elif code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "):
        TALLY["refused cleanly"] += 1
    return code, err


@pytest.mark.parametrize("case, source, damage, command, flags, expected", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line(sources, tmp_path, capsys, case, source, damage, command, flags, expected):
    victim = tmp_path / "input"
    shutil.copytree(sources[source], victim, symlinks=True)
    if damage is not None:
        damage(victim)
    out = tmp_path / "out"
    code, err = replay(capsys, [command, "--load", str(victim), "--save", str(out), *flags], out)
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("command, source", [("hf2mcore", "hf"), ("mcore2hf", "torch_dist")])
def test_allow_non_finite_warns_once_and_converts(sources, tmp_path, capsys, command, source):
    victim = tmp_path / "input"
    if source == "hf":
        shutil.copytree(sources["hf"], victim)
        poison_hf(float("nan"))(victim)
    else:  # a torch_dist checkpoint holding a NaN, made by an allowed conversion
        hf = tmp_path / "hf"
        shutil.copytree(sources["hf"], hf)
        poison_hf(float("nan"))(hf)
        assert convert_main(["hf2mcore", "--load", str(hf), "--save", str(victim), "--allow-non-finite"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert convert_main([command, "--load", str(victim), "--save", str(out), "--allow-non-finite"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "holds 1 NaN" in warnings[0], warnings
    assert out.is_dir()


VERIFY_CASES = [
    ("verify-missing-hf", lambda s, t: ["--hf", str(t / "nope"), "--mcore", str(s["torch_dist"])],
     "is not a HF model directory"),
    ("verify-tp-0", lambda s, t: ["--hf", str(s["hf"]), "--mcore", str(s["torch_dist"]), "--tp", "0"],
     "--tp must be >= 1 (got 0)"),
    ("verify-tp-3-on-8-heads", lambda s, t: ["--hf", str(s["hf"]), "--mcore", str(s["torch_dist"]), "--tp", "3"],
     "--tp 3 does not divide the 8 attention heads"),
]


@pytest.mark.parametrize("case, args, expected", VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES])
def test_verify_refuses_before_spawning(sources, tmp_path, capsys, monkeypatch, case, args, expected):
    import megatron_patch.convert.verify as verify

    def no_ranks(*_args, **_kwargs):
        raise AssertionError("ranks were spawned before the arguments were checked")

    monkeypatch.setattr(verify, "megatron_logits", no_ranks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = replay(capsys, ["verify", *args(sources, tmp_path)], tmp_path / "none")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert expected in err, err
