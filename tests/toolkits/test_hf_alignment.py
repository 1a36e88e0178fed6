"""toolkits/benchmarks/hf_alignment.py: our training (the real entry point) and a plain transformers loop on the same
batches give the same loss curve, per family, on tiny models (fp32, CPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "toolkits" / "benchmarks" / "hf_alignment.py"


def _alignment():
    spec = importlib.util.spec_from_file_location("hf_alignment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _baichuan_dir(root: Path) -> str:
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import train_tokenizer
    from tests.reference import baichuan, save_hf_dir

    config = get_family("baichuan").flavor("tiny")  # Baichuan-7B: RoPE, no NormHead
    hf_dir = save_hf_dir(root / "baichuan", config, baichuan.random_checkpoint(config, seed=0))
    train_tokenizer(hf_dir, vocab_size=min(512, config["vocab_size"]))
    return hf_dir


CASES = [  # family, mode, extra flags; llama (pretraining) and bloom (SFT: label shift, loss mask) run in CI
    pytest.param("llama", "pretrain", [], id="llama-pretrain"),
    pytest.param("bloom", "sft", [], id="bloom-sft"),
    pytest.param("qwen", "sft", ["--calculate-per-token-loss"], id="qwen-sft-per-token", marks=pytest.mark.slow),
    pytest.param("baichuan", "pretrain", [], id="baichuan-pretrain", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family,mode,extra", CASES)
def test_loss_curve_matches_transformers(family, mode, extra, make_hf, tmp_path, capsys):
    hf_dir = _baichuan_dir(tmp_path) if family == "baichuan" else make_hf(f"align_{family}", family=family)
    code = _alignment().main(["--hf", hf_dir, "--mode", mode, "--steps", "4", "--lr-warmup-iters", "1",
                              "--seq-length", "96", "--work", str(tmp_path / "work"), *extra])
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"max relative loss difference (\S+) over 4 steps", last)
    assert match, out[-2000:]
    assert code == 0 and float(match.group(1)) <= 1e-4, out[-2000:]
    weights = re.search(r"final weights .*: max abs difference (\S+)", out)
    assert weights and float(weights.group(1)) <= 1e-4, out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_tp2_pp2_fifty_steps(mode, make_hf, tmp_path, capsys):
    hf_dir = make_hf("align_llama", family="llama")
    code = _alignment().main(["--hf", hf_dir, "--tp", "2", "--pp", "2", "--mode", mode, "--steps", "50",
                              "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
