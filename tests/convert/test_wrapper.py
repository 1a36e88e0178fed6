"""The positional shell wrapper end to end, through the real CLI processes (spawned ranks included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "toolkits" / "model_checkpoints_convertor" / "model_convertor.sh"


def run(*args, check=True):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())}
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("args,needle", [
    ((1, 2, 3), "expected 8 to 10 arguments"),
    (("none", "SRC", "DST", 1, 1, "qwen_moe", 0, "false", "legacy", 0), "EP must be a positive integer"),
    (("none", "SRC", "DST", "two", 1, "llama", 0, "false"), "TP must be a positive integer"),
    (("none", "SRC", "DST", 1, 1, "llama", 0, "maybe"), "MG2HF must be true or false"),
    (("none", "SRC", "DST", 1, 1, "llama", 0, "false", "zarr"), "FORMAT must be torch_dist or legacy"),
    (("none", "/does/not/exist", "DST", 1, 1, "llama", 0, "false"), "does not exist"),
])
def test_wrapper_validates_arguments(args, needle):
    proc = run(*args, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "MEGATRON_PATH" in proc.stderr


def test_wrapper_round_trip_with_extra_vocab(make_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf("gqa_untied")
    run("none", hf_dir, tmp_path / "mcore", 1, 2, "llama-2-7b", 3, "false")
    run("none", tmp_path / "mcore", tmp_path / "back", 1, 1, "llama", 0, "true")
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    extended = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert extended.config.vocab_size == original.config.vocab_size + 3
    tokens = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        before, after = original(tokens).logits, extended(tokens).logits
    # Old tokens keep their logits; the three new rows start as the mean of the old embeddings.
    assert torch.equal(after[..., : original.config.vocab_size], before)
    emb = extended.get_input_embeddings().weight
    assert torch.allclose(emb[-3:], original.get_input_embeddings().weight.mean(0).expand(3, -1), atol=1e-6)


def test_usage_is_the_header_comment_only():
    proc = run(check=False)
    assert proc.returncode == 2 and "set -euo pipefail" not in proc.stderr and "MP_EXTRA_ARGS" in proc.stderr
    vocab = Path(__file__).resolve().parents[2] / "toolkits" / "vocab_extension" / "run_vocab_extension.sh"
    proc = subprocess.run(["bash", str(vocab)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "set -euo" not in proc.stderr and "VOCAB_SIZE" in proc.stderr


def test_extra_args_reach_the_converter(make_hf, tmp_path):
    import os

    hf_dir = make_hf("gqa_untied")
    target = tmp_path / "mcore"
    run("none", hf_dir, target, 1, 1, "llama", 0, "false", "legacy")
    again = run("none", hf_dir, target, 1, 1, "llama", 0, "false", "legacy", check=False)
    assert again.returncode == 1 and "pass --overwrite" in again.stderr
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home()),
           "MP_EXTRA_ARGS": "--overwrite", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(["bash", str(SCRIPT), "none", hf_dir, str(target), "1", "1", "llama", "0", "false",
                           "legacy"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_wrapper_converts_a_moe_model_per_expert_parallel_rank(make_hf, tmp_path):
    """A Qwen2-MoE name with a size suffix picks the qwen_moe family; EP=2 legacy writes Megatron-LM's per-EP-rank
    files; the way back is bit-exact."""
    from safetensors.torch import load_file

    hf_dir = make_hf("wrapper_qwen2_moe", family="qwen_moe")
    run("none", hf_dir, tmp_path / "mcore", 1, 1, "qwen2-moe-a14b", 0, "false", "legacy", 2)
    assert sorted(p.name for p in (tmp_path / "mcore" / "release").glob("mp_rank_*")) == ["mp_rank_00_000",
                                                                                         "mp_rank_00_001"]
    run("none", tmp_path / "mcore", tmp_path / "back", 1, 1, "auto", 0, "true")
    original, back = load_file(f"{hf_dir}/model.safetensors"), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], v) for k, v in original.items())
