"""The positional launch scripts: validation names the bad argument; flags reach the Python entry (dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["llama", "qwen", "baichuan", "bloom"]


def pretrain_args(tmp_path, **kw) -> list[str]:
    (tmp_path / "d.bin").write_text("")
    args = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="tiny", BATCH_SIZE="2",
                GLOBAL_BATCH_SIZE="8", LR="1e-4", MIN_LR="1e-5", SEQ_LEN="128", PAD_LEN="128", EXTRA_VOCAB_SIZE="0",
                PR="bf16", TP="2", PP="1", AC="sel", DO="false", FL="false", SP="true", SAVE_INTERVAL="100",
                DATASET_PATH=str(tmp_path / "d"), PRETRAIN_CHECKPOINT_PATH=str(tmp_path),
                TRAIN_TOKENS=str(8 * 128 * 50), WARMUP_TOKENS=str(8 * 128 * 5), OUTPUT_BASEPATH=str(tmp_path / "o"))
    args.update(kw)
    return list(args.values())


def finetune_args(tmp_path, **kw) -> list[str]:
    (tmp_path / "t.jsonl").write_text("{}\n")
    args = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="tiny", BATCH_SIZE="2",
                LR="1e-4", MIN_LR="1e-5", SEQ_LEN="128", PAD_LEN="64", EXTRA_VOCAB_SIZE="16", PR="fp32", TP="1",
                PP="2", AC="full", DO="false", FL="false", SP="false", TRAIN_DATASET_PATH=str(tmp_path / "t.jsonl"),
                VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH=str(tmp_path), EPOCH="3",
                OUTPUT_BASEPATH=str(tmp_path / "o"))
    args.update(kw)
    return list(args.values())


def run_script(family: str, kind: str, args: list[str]):
    script = ROOT / "examples" / family / f"run_{kind}_megatron_{family}.sh"
    env = {**os.environ, "MP_DRY_RUN": "1"}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrain_flags(tmp_path, family):
    result = run_script(family, "pretrain", pretrain_args(tmp_path))
    assert result.returncode == 0, result.stderr
    cmd = result.stdout
    for flag in (f"--model-name {family}", "--tensor-model-parallel-size 2", "--global-batch-size 8",
                 "--train-iters 50", "--lr-warmup-iters 5", "--bf16", "--sequence-parallel",
                 "--recompute-granularity selective", "--nproc-per-node 2", "-m megatron_patch.train pretrain",
                 "--transformer-impl transformer_engine"):
        assert flag in cmd, (flag, cmd)


def test_finetune_flags(tmp_path):
    result = run_script("llama", "finetune", finetune_args(tmp_path))
    assert result.returncode == 0, result.stderr
    for flag in ("--epochs 3", "--max-padding-length 64", "--extra-vocab-size 16", "--global-batch-size 2",
                 "--recompute-granularity full", "-m megatron_patch.train finetune"):
        assert flag in result.stdout, (flag, result.stdout)


def test_fp8_flags(tmp_path):
    result = run_script("llama", "pretrain", pretrain_args(tmp_path, PR="fp8", FL="true"))
    assert result.returncode == 0, result.stderr
    for flag in ("--bf16", "--fp8-format hybrid", "--fp8-amax-history-len 1024", "--fp8-amax-compute-algo max",
                 "--transformer-impl transformer_engine", "--use-flash-attn"):
        assert flag in result.stdout


@pytest.mark.parametrize("change,message", [
    (dict(PR="fp9"), "PR must be one of: fp32 fp16 bf16 fp8"),
    (dict(BATCH_SIZE="two"), "BATCH_SIZE must be an integer"),
    (dict(AC="some"), "AC must be one of: none sel full"),
    (dict(ENV="k8s"), "ENV must be one of: dsw dlc cpu"),
    (dict(TRAIN_TOKENS="100"), "TRAIN_TOKENS (100) is less than one global batch"),
    (dict(DO="yes"), "DO must be one of: true false"),
])
def test_bad_argument_named(tmp_path, change, message):
    result = run_script("llama", "pretrain", pretrain_args(tmp_path, **change))
    assert result.returncode == 2
    assert message in result.stderr and "usage: run_pretrain_megatron_llama.sh ENV MEGATRON_PATH" in result.stderr


def test_pai_megatron_patch_25_argument_layout(tmp_path):
    """Pai-Megatron-Patch's pretraining layout of baichuan (2023-09) and llama2/qwen (one week of 2023-10): TE right
    after SP, MEGATRON_PATH kept (25 arguments)."""
    args = pretrain_args(tmp_path, SP="false")
    with_te = args[:18] + ["true"] + args[18:]
    result = run_script("llama", "pretrain", with_te)
    assert result.returncode == 0, result.stderr
    assert "--transformer-impl transformer_engine" in result.stdout and "--train-iters 50" in result.stdout
    result = run_script("llama", "pretrain", args[:18] + ["false"] + args[18:])
    assert result.returncode == 0 and "--transformer-impl" not in result.stdout, result.stdout
    result = run_script("llama", "pretrain", args[:18] + ["maybe"] + args[18:])
    assert result.returncode == 2 and "TE must be one of: true false" in result.stderr
    result = run_script("llama", "pretrain", args[:-2])
    assert result.returncode == 2 and "expected 23/24/25/26/27 arguments (the layouts above), got 22" in result.stderr
    assert "   or: run_pretrain_megatron_llama.sh ENV MEGATRON_PATH" in result.stderr


def test_rules_between_arguments_are_checked_once_in_python(tmp_path):
    """SP with TP=1 passes the shell's shape checks; the Python pre-flight refuses it before any rank starts."""
    script = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(script), *pretrain_args(tmp_path, SP="true", TP="1")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]  # tee'd into the log
    # The flags, and the script's arguments the user typed behind them.
    assert errors == ["error: --sequence-parallel needs --tensor-model-parallel-size > 1 [the script's TP=1, SP=true]"
                      ], result.stdout


def test_wrong_count(tmp_path):
    result = run_script("qwen", "finetune", finetune_args(tmp_path)[:-1])
    assert result.returncode == 2 and "expected 22/23/26/27 arguments (the layouts above), got 21" in result.stderr


def test_dlc_needs_scheduler_env(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    script = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
    result = subprocess.run(["bash", str(script), *pretrain_args(tmp_path, ENV="dlc")], capture_output=True,
                            text=True, env={**env_free, "MP_DRY_RUN": "1", "GPUS_PER_NODE": "8"}, timeout=60)
    assert result.returncode == 2 and "ENV=dlc needs MASTER_ADDR" in result.stderr


def _path_without_nvidia_smi(tmp_path, fake_nvidia_smi: str | None) -> str:
    """A PATH holding only the tools the scripts use before launching, plus an optional fake nvidia-smi."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "awk", "dirname", "grep", "wc", "cat", "sed", "mkdir", "tee", "date"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if fake_nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/bash\n{fake_nvidia_smi}\n")
        fake.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("env_name", ["dsw", "dlc"])
@pytest.mark.parametrize("nvidia_smi", [None, "echo 'NVIDIA-SMI has failed' >&2; exit 9"],
                         ids=["missing", "failing"])
def test_gpu_env_without_gpus_says_so(tmp_path, env_name, nvidia_smi):
    """ENV=dsw/dlc on a machine without (working) nvidia-smi: the error line, not a silent exit 127."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    env.update(PATH=_path_without_nvidia_smi(tmp_path, nvidia_smi), MP_DRY_RUN="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="6000", WORLD_SIZE="1", RANK="0")
    script = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
    result = subprocess.run(["bash", str(script), *pretrain_args(tmp_path, ENV=env_name)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert f"error: ENV={env_name} found no GPU" in result.stderr


def test_gpus_per_node_without_gpus_is_said(tmp_path):
    """ENV=dsw with GPUS_PER_NODE=2 on a machine without GPUs: a note that the ranks train on the CPU, not silence."""
    env = {k: v for k, v in os.environ.items() if k != "MP_DRY_RUN"}
    env.update(PATH=_path_without_nvidia_smi(tmp_path, None), GPUS_PER_NODE="2", PYTHON="/nonexistent/python")
    script = ROOT / "examples" / "llama" / "run_pretrain_megatron_llama.sh"
    result = subprocess.run(["bash", str(script), *pretrain_args(tmp_path, ENV="dsw")], capture_output=True,
                            text=True, env=env, timeout=60)  # stops at the pre-flight: no python on that PATH
    assert "note: ENV=dsw with GPUS_PER_NODE=2, but this machine has no GPU" in result.stderr, result.stderr


def test_finetune_peft_argument(tmp_path):
    result = run_script("qwen", "finetune", finetune_args(tmp_path) + ["lora:16:32"])
    assert result.returncode == 0, result.stderr
    assert "--lora-rank 16 --lora-alpha 32" in result.stdout, result.stdout
    result = run_script("qwen", "finetune", finetune_args(tmp_path) + ["lora"])
    assert "--lora-rank 8 --lora-alpha 16" in result.stdout, result.stdout
    assert "--lora-rank" not in run_script("qwen", "finetune", finetune_args(tmp_path) + ["none"]).stdout
    bad = run_script("qwen", "finetune", finetune_args(tmp_path) + ["lora:x"])
    assert bad.returncode == 2 and "PEFT must be none, lora, lora:RANK or lora:RANK:ALPHA (got 'lora:x')" in bad.stderr
