"""Every argument layout Pai-Megatron-Patch shipped for its pretraining / finetuning scripts, as its users type them.

The argument lists below are written out from Pai-Megatron-Patch's scripts (the `NAME=$N` lines and the example
command in each script's first lines), independently of examples/common.sh: each must be read as the layout it is
(the script says which), and each argument must reach the flag it means. Dry runs: no training.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# name -> (scripts and dates in Pai-Megatron-Patch, the positional names in order)
PRETRAIN = {
    "2023-10-18..head (llama2, qwen, qwen1.5, llama3, mistral, baichuan2, ...)": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR "
        "TP PP AC DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS "
        "OUTPUT_BASEPATH", "since 2023-10-18"),
    "2023-09 (llama, llama2, qwen, codellama, falcon, ...)": (
        "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN "
        "EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS "
        "WARMUP_TOKENS OUTPUT_BASEPATH", "of 2023-09 (MEGATRON_PATH, no TE)"),
    "baichuan 2023-09, llama2/qwen 2023-10-10..16": (
        "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN "
        "EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS "
        "WARMUP_TOKENS OUTPUT_BASEPATH", "with MEGATRON_PATH and TE at 19"),
    "bloom 2023-09": (
        "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN "
        "EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS "
        "WARMUP_TOKENS OUTPUT_BASEPATH", "bloom pretraining layout"),
}
FINETUNE = {
    "2023-10-18..head (llama2, qwen, qwen1.5, mistral, ...)": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP "
        "TE TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH", "since 2023-10-18"),
    "2023-09 (llama, llama2, qwen, baichuan, bloom, ...)": (
        "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP "
        "AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH",
        "of 2023-09 (MEGATRON_PATH, no TE)"),
    "llama2/qwen 2023-10-12..16": (
        "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP "
        "AC DO FL SP TE TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH",
        "with MEGATRON_PATH and TE at 18"),
}


def values(tmp_path) -> dict:
    """Pai's example command lines (qwen pretraining 1.8B, llama2 finetuning 13B), on this machine's paths."""
    (tmp_path / "d_text_document.bin").write_text("")
    (tmp_path / "train.json").write_text("{}\n")
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    return dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="tiny", BATCH_SIZE="1",
                GLOBAL_BATCH_SIZE="8", LR="1e-5", MIN_LR="1e-6", SEQ_LEN="2048", PAD_LEN="80", EXTRA_VOCAB_SIZE="85",
                PR="bf16", TP="1", PP="1", AC="sel", DO="true", FL="false", SP="false", TE="false",
                SAVE_INTERVAL="100000", DATASET_PATH=str(tmp_path / "d_text_document"),
                PRETRAIN_CHECKPOINT_PATH=str(tmp_path / "ckpt"), TRAIN_TOKENS="100000000", WARMUP_TOKENS="10000",
                OUTPUT_BASEPATH=str(tmp_path / "out"), TRAIN_DATASET_PATH=str(tmp_path / "train.json"),
                VALID_DATASET_PATH=str(tmp_path / "train.json"), EPOCH="2")


def dry_run(kind: str, family: str, args: list[str]):
    script = ROOT / "examples" / family / f"run_{kind}_megatron_{family}.sh"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MP_DRY_RUN": "1"})


def flag(cmd: str, name: str) -> str | None:
    words = shlex.split(cmd)  # the dry run prints the command shell-quoted
    return words[words.index(name) + 1] if name in words else None


@pytest.mark.parametrize("layout", list(PRETRAIN))
def test_pretrain_layouts(tmp_path, layout):
    names, said = PRETRAIN[layout]
    v = values(tmp_path)
    result = dry_run("pretrain", "qwen", [v[name] for name in names.split()])
    assert result.returncode == 0, result.stderr
    assert said in result.stderr.splitlines()[0], result.stderr  # the layout it read
    cmd = result.stdout
    iters = 100000000 // (8 * 2048)
    for name, want in (("--micro-batch-size", "1"), ("--global-batch-size", "8"), ("--lr", "1e-5"),
                       ("--min-lr", "1e-6"), ("--seq-length", "2048"), ("--extra-vocab-size", "85"),
                       ("--train-iters", str(iters)), ("--save-interval", "100000"), ("--load", v["PRETRAIN_CHECKPOINT_PATH"]),
                       ("--data-path", v["DATASET_PATH"]), ("--lr-decay-style", "linear"), ("--split", "98,2,0"),
                       ("--eval-interval", "100"), ("--eval-iters", "10")):
        assert flag(cmd, name) == want, (name, cmd)
    assert "--bf16" in cmd and "--use-distributed-optimizer" in cmd and "--recompute-granularity selective" in cmd
    assert "--transformer-impl" not in cmd  # TE=false (or no TE) and nothing that needs it


@pytest.mark.parametrize("layout", list(FINETUNE))
def test_finetune_layouts(tmp_path, layout):
    names, said = FINETUNE[layout]
    v = values(tmp_path)
    result = dry_run("finetune", "llama", [v[name] for name in names.split()])
    assert result.returncode == 0, result.stderr
    assert said in result.stderr.splitlines()[0], result.stderr
    cmd = result.stdout
    for name, want in (("--micro-batch-size", "1"), ("--lr", "1e-5"), ("--seq-length", "2048"),
                       ("--max-padding-length", "80"), ("--epochs", "2"), ("--train-data-path", v["TRAIN_DATASET_PATH"]),
                       ("--valid-data-path", v["VALID_DATASET_PATH"]), ("--lr-decay-style", "cosine")):
        assert flag(cmd, name) == want, (name, cmd)


def test_te_position_read_from_the_new_layout(tmp_path):
    """Pai's 24-argument layout: TE=true at position 18 asks for TE layers; FL=true with TE=false (Pai's qwen example)
    still runs flash attention through TE and says so."""
    names = PRETRAIN["2023-10-18..head (llama2, qwen, qwen1.5, llama3, mistral, baichuan2, ...)"][0].split()
    v = values(tmp_path)
    result = dry_run("pretrain", "llama", [v[n] if n != "TE" else "true" for n in names])
    assert result.returncode == 0 and "--transformer-impl transformer_engine" in result.stdout, result.stderr
    result = dry_run("pretrain", "llama", [v[n] if n != "FL" else "true" for n in names])
    assert result.returncode == 0 and "--use-flash-attn" in result.stdout, result.stderr
    assert "note: FL=true runs on Transformer Engine layers here, although TE=false" in result.stderr


def test_same_count_told_apart_by_content(tmp_path):
    """24 arguments of the old layout with a typo: read as the old layout (the error names its argument), not as
    Pai's new one."""
    names = PRETRAIN["2023-09 (llama, llama2, qwen, codellama, falcon, ...)"][0].split()
    v = {**values(tmp_path), "PR": "bf17"}
    result = dry_run("pretrain", "llama", [v[n] for n in names])
    assert result.returncode == 2
    assert "of 2023-09" in result.stderr and "PR must be one of: fp32 fp16 bf16 fp8 (got 'bf17')" in result.stderr


def test_model_size_auto(tmp_path):
    names = FINETUNE["2023-10-18..head (llama2, qwen, qwen1.5, mistral, ...)"][0].split()
    v = {**values(tmp_path), "MODEL_SIZE": "auto"}
    result = dry_run("finetune", "llama", [v[n] for n in names])
    assert result.returncode == 0 and "--model-size" not in result.stdout, result.stderr
    v["PRETRAIN_CHECKPOINT_PATH"] = "none"
    result = dry_run("finetune", "llama", [v[n] for n in names])
    assert result.returncode == 2 and "MODEL_SIZE=auto reads the model's shape from PRETRAIN_CHECKPOINT_PATH" in result.stderr
