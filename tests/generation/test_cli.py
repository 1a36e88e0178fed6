"""The generation entry and its launch script: an end-to-end run through torchrun compared with transformers on
the same text, and the argument checks that must fail before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.generate import main as generate_main
from megatron_patch.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "llama" / "run_text_generation_megatron_llama.sh"
PROMPTS = ["The quick brown fox jumps", "Megatron splits each layer across", "A quiet village"]
OUTPUT_LEN = 10


@pytest.fixture(scope="module")
def llama(make_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-cli")
    hf_dir = make_hf("gqa_untied")
    hf_to_mcore(hf_dir, root / "mcore", tp=2, fmt="legacy")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return hf_dir, root / "mcore", prompts, root


def script_args(checkpoint, input_file, output_file, **overrides):
    values = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), CHECKPOINT_PATH=str(checkpoint),
                  MODEL_SIZE="tiny", TP="1", BS="2", SEQ_LEN="64", PAD_LEN="32", EXTRA_VOCAB_SIZE="0", PR="fp32",
                  TOP_K="1", INPUT_SEQ_LEN="32", OUTPUT_SEQ_LEN=str(OUTPUT_LEN), INPUT_FILE=str(input_file),
                  OUTPUT_FILE=str(output_file), TOP_P="0", TEMPERATURE="1.0", REPETITION_PENALTY="1.0")
    values.update(overrides)
    return list(values.values())


def run_script(args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **env})


def transformers_completions(hf_dir, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    completions = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN,
                                       do_sample=False, pad_token_id=0)
        completions.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


def test_script_generates_what_transformers_generates(llama):
    """Greedy through the script (torchrun, the checkpoint saved at TP=2 loaded at TP=1, batch of 2 prompts of
    different lengths) equals transformers' generate on the same text, decoded the same way."""
    hf_dir, mcore, prompts, root = llama
    out = root / "completions.jsonl"
    result = run_script(script_args(mcore, prompts, out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == transformers_completions(hf_dir, PROMPTS)


def test_data_parallel_ranks_share_the_prompts(llama):
    """Two processes at TP=1: each data-parallel rank generates every other prompt; rank 0 writes all, in order."""
    hf_dir, mcore, prompts, root = llama
    out = root / "completions-dp.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "megatron_patch.generate",
               *_entry_args(mcore, prompts, out, "--micro-batch-size", "1", "--out-seq-length", str(OUTPUT_LEN))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == transformers_completions(hf_dir, PROMPTS)


@pytest.mark.parametrize("overrides,message", [
    (dict(PR="fp8"), "PR must be one of"),
    (dict(TEMPERATURE="warm"), "TEMPERATURE must be a non-negative number"),
    (dict(TP="0"), "TP must be an integer >= 1"),
    (dict(ENV="local"), "ENV must be one of"),
    (dict(INPUT_FILE="/nonexistent/prompts.txt"), "INPUT_FILE '/nonexistent/prompts.txt' is not a file"),
    (dict(CHECKPOINT_PATH="/nonexistent/ckpt"), "CHECKPOINT_PATH '/nonexistent/ckpt' does not exist"),
])
def test_script_rejects_bad_arguments(llama, overrides, message):
    _, mcore, prompts, root = llama
    result = run_script(script_args(mcore, prompts, root / "never.jsonl", **overrides))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (root / "never.jsonl").exists()


@pytest.mark.parametrize("overrides,message", [
    (dict(TOP_K="5", TOP_P="0.9"), "--top-k 5 and --top-p 0.9 are both non-zero"),
    (dict(PAD_LEN="100"), "--max-padding-length must be in [1, --seq-length 64] (got 100)"),
    (dict(INPUT_SEQ_LEN="60"), "--input-len 60 + --out-seq-length"),
    (dict(TEMPERATURE="0"), "--temperature must be > 0"),
    (dict(MODEL_SIZE="7B"), "--model-size 7B (32 layers, hidden 4096) does not match the --load checkpoint"),
])
def test_script_rules_between_arguments_fail_in_the_python_preflight(llama, overrides, message):
    """The shell checks shapes only; the rest fails once, in Python, before torchrun starts a rank."""
    _, mcore, prompts, root = llama
    result = run_script(script_args(mcore, prompts, root / "never.jsonl", **overrides))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (root / "never.jsonl").exists()


def test_script_accepts_the_layout_without_megatron_path(llama):
    """Pai-Megatron-Patch's newer generation scripts have no MEGATRON_PATH: 18 arguments."""
    _, mcore, prompts, root = llama
    args = script_args(mcore, prompts, root / "never.jsonl")
    result = run_script([args[0], *args[2:]], MP_DRY_RUN="1")
    assert result.returncode == 0 and "-m megatron_patch.generate" in result.stdout, result.stderr
    result = run_script(args[:5])
    assert result.returncode == 2 and "expected 18/19 arguments (the layouts above), got 5" in result.stderr


def test_script_needs_every_argument(llama):
    result = run_script(["cpu", "none"])
    assert result.returncode == 2 and "expected 18/19 arguments (the layouts above), got 2" in result.stderr


def _entry_args(mcore, prompts, out, *extra):
    return ["--load", str(mcore), "--seq-length", "64", "--out-seq-length", "8", "--text-generate-input-file",
            str(prompts), "--text-generate-output-file", str(out), *extra]


@pytest.mark.parametrize("extra,message", [
    (["--pp", "2"], "1 processes were launched for TP x PP = 1 x 2"),
    (["--model-size", "7B"], "--model-size 7B (32 layers, hidden 4096) does not match the --load checkpoint"),
    (["--model-name", "qwen"], "holds a 'llama' model, not 'qwen'"),
    (["--extra-vocab-size", "3"], "--extra-vocab-size 3 differs from the checkpoint's 0"),
    (["--seq-length", "4096", "--input-len", "16"], "--seq-length 4096 exceeds the model's 512 positions"),
    (["--prompt-key", "text"], "line 1: no key 'text' (keys: id, prompt); set --prompt-key"),
    (["--top-k", "0", "--temperature", "-1"], "--temperature must be > 0"),
])
def test_entry_fails_early_with_one_line(llama, capsys, extra, message):
    _, mcore, prompts, root = llama
    assert generate_main(_entry_args(mcore, prompts, root / "never.jsonl", *extra)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (root / "never.jsonl").exists()
