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


# --- mixture of experts (examples/qwen_moe, examples/mixtral) -------------------------------------------------------
# Pai-Megatron-Patch's MoE scripts for Qwen1.5-MoE-A2.7B: examples/qwen1_5/run_pretrain_mcore_qwen.sh (MOE at 19, EP
# fixed inside the script) and run_finetune_mcore_qwen_withGA.sh (MOE at 19, EP at 20 since 2025-05; iterations, a
# global batch and a save interval). The 26-argument pretraining layout (EP after MOE) is this toolkit's.
MOE_PRETRAIN = {
    "qwen1.5 MoE pretraining 2024-04..head": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR "
        "TP PP AC DO FL SP TE MOE SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS "
        "OUTPUT_BASEPATH", "MoE pretraining layout since 2024-04", "1"),
    "EP after MOE": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR "
        "TP PP AC DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS "
        "OUTPUT_BASEPATH", "MoE pretraining layout with EP after MOE", "4"),
    # examples/qwen3/run_mcore_qwen3.sh (and qwen2/run_mcore_qwen2_moe.sh since 2025-07): Pai's current one.
    "qwen3 / qwen2-moe mcore 2025-07..head": (
        "ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP SP DO FL SFT AC "
        "OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS "
        "WARMUP_TOKENS OUTPUT_BASEPATH", "current MoE layout (run_mcore_qwen3.sh", "4"),
}
MOE_FINETUNE = {
    "qwen1.5 MoE finetuning 2025-05..head": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR "
        "TP PP AC DO FL SP TE MOE EP SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS "
        "WARMUP_ITERS OUTPUT_BASEPATH", "MoE finetuning layout since 2025-05", "4"),
    "qwen1.5 MoE finetuning 2024-04": (
        "ENV MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR "
        "TP PP AC DO FL SP TE MOE SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS "
        "WARMUP_ITERS OUTPUT_BASEPATH", "MoE finetuning layout of 2024-04", "1"),
}


def moe_values(tmp_path) -> dict:
    """Pai's Qwen1.5-MoE-A2.7B example commands (TP 2, EP 4, MOE true, 100000 iterations), on this machine's paths."""
    v = values(tmp_path)
    v.update(TP="2", MOE="true", EP="4", TE="false", SAVE_INTERVAL="500", DATASET_PATH=str(tmp_path / "d_text_document"),
             TRAIN_ITERS="100000", WARMUP_ITERS="10000", SEQ_LEN="128", PAD_LEN="128", CP="1", ETP="2", SFT="false",
             OPTIMIZER_OFFLOAD="false")
    return v


@pytest.mark.parametrize("family", ["qwen_moe", "mixtral"])
@pytest.mark.parametrize("layout", list(MOE_PRETRAIN))
def test_moe_pretrain_layouts(tmp_path, layout, family):
    names, said, ep = MOE_PRETRAIN[layout]
    v = moe_values(tmp_path)
    result = dry_run("pretrain", family, [v[name] for name in names.split()])
    assert result.returncode == 0, result.stderr
    assert said in result.stderr.splitlines()[0], result.stderr
    cmd = result.stdout
    coeff = {"qwen_moe": "0.001", "mixtral": "0.02"}[family]
    for name, want in (("--expert-model-parallel-size", ep), ("--moe-token-dispatcher-type", "alltoall"),
                       ("--moe-router-load-balancing-type", "aux_loss"), ("--moe-aux-loss-coeff", coeff),
                       ("--tensor-model-parallel-size", "2"), ("--save-interval", "500"),
                       ("--data-path", v["DATASET_PATH"]), ("--train-iters", str(100000000 // (8 * 128))),
                       ("--model-name", family), ("--nproc-per-node", str(2 * int(ep)))):  # ENV=cpu: TP x PP x EP
        assert flag(cmd, name) == want, (name, cmd)
    assert flag(cmd, "--save").endswith(f"-tp2-pp1-ep{ep}")


@pytest.mark.parametrize("layout", list(MOE_FINETUNE))
def test_moe_finetune_layouts(tmp_path, layout):
    names, said, ep = MOE_FINETUNE[layout]
    v = moe_values(tmp_path)
    v["DATASET_PATH"] = v["TRAIN_DATASET_PATH"]  # Pai's MoE finetuning names the training jsonl DATASET_PATH
    result = dry_run("finetune", "qwen_moe", [v[name] for name in names.split()])
    assert result.returncode == 0, result.stderr
    assert said in result.stderr.splitlines()[0], result.stderr
    cmd = result.stdout
    for name, want in (("--expert-model-parallel-size", ep), ("--global-batch-size", "8"), ("--train-iters", "100000"),
                       ("--lr-warmup-iters", "10000"), ("--save-interval", "500"),
                       ("--train-data-path", v["DATASET_PATH"]), ("--valid-data-path", v["VALID_DATASET_PATH"]),
                       ("--max-padding-length", "128"), ("--lr-decay-style", "cosine")):
        assert flag(cmd, name) == want, (name, cmd)
    assert "--epochs" not in cmd


def test_moe_families_keep_the_older_layouts(tmp_path):
    """Pai's mixtral scripts (2024-01..04) had the dense 24 / 22 layouts: read as such, at EP=1 with MoE flags."""
    v = moe_values(tmp_path)
    result = dry_run("pretrain", "mixtral", [v[n] for n in PRETRAIN[next(iter(PRETRAIN))][0].split()])
    assert result.returncode == 0 and "since 2023-10-18" in result.stderr, result.stderr
    assert flag(result.stdout, "--expert-model-parallel-size") == "1" and "--moe-aux-loss-coeff 0.02" in result.stdout
    result = dry_run("finetune", "mixtral", [v[n] for n in FINETUNE[next(iter(FINETUNE))][0].split()])
    assert result.returncode == 0 and flag(result.stdout, "--epochs") == "2", result.stderr


@pytest.mark.parametrize("kind,family,change,message", [
    ("pretrain", "qwen", dict(), "MOE=true, but qwen is a dense family"),
    ("pretrain", "llama", dict(MOE="false"), "EP=4 needs a mixture-of-experts model; llama has no experts"),
    ("finetune", "mixtral", dict(MOE="false"), "MOE=false, but mixtral is a mixture-of-experts family"),
    ("finetune", "qwen_moe", dict(EP="0"), "EP must be an integer >= 1 (got '0')"),
    ("finetune", "qwen_moe", dict(MOE="yes"), "MOE must be one of: true false (got 'yes')"),
    ("finetune", "qwen_moe", dict(DATASET_PATH="/nonexistent.json"), "DATASET_PATH '/nonexistent.json' is not a file"),
])
def test_moe_arguments_refused(tmp_path, kind, family, change, message):
    layouts = {"pretrain": MOE_PRETRAIN["EP after MOE"][0], "finetune": MOE_FINETUNE[next(iter(MOE_FINETUNE))][0]}
    v = moe_values(tmp_path)
    if kind == "finetune":
        v["DATASET_PATH"] = v["TRAIN_DATASET_PATH"]
    v.update(change)
    result = dry_run(kind, family, [v[n] for n in layouts[kind].split()])
    assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr


@pytest.mark.parametrize("change,message", [
    (dict(CP="2"), "CP=2: context parallelism is not supported here (pass CP=1)"),
    (dict(ETP="1"), "ETP=1: the experts are split over the TP ranks here (expert-TP = TP): pass ETP=2"),
    (dict(OPTIMIZER_OFFLOAD="0.5"), "OPTIMIZER_OFFLOAD=0.5: optimizer offload is not supported here"),
    (dict(SFT="true"), "SFT=true: finetuning reads a jsonl with run_finetune_megatron_qwen_moe.sh"),
])
def test_pai_current_layout_refuses_what_is_missing_here(tmp_path, change, message):
    v = {**moe_values(tmp_path), **change}
    result = dry_run("pretrain", "qwen_moe", [v[n] for n in MOE_PRETRAIN["qwen3 / qwen2-moe mcore 2025-07..head"][0].split()])
    assert result.returncode == 2 and f"error: {message}" in result.stderr, result.stderr


def test_pai_current_layout_on_a_dense_family(tmp_path):
    """Pai's run_mcore_qwen3.sh trains the dense Qwen3 sizes too (EP 1, ETP 1 whatever TP): read, no MoE flags."""
    v = {**moe_values(tmp_path), "EP": "1", "ETP": "1"}
    result = dry_run("pretrain", "qwen", [v[n] for n in MOE_PRETRAIN["qwen3 / qwen2-moe mcore 2025-07..head"][0].split()])
    assert result.returncode == 0, result.stderr
    assert flag(result.stdout, "--tensor-model-parallel-size") == "2" and "--moe-" not in result.stdout
    assert "--expert-model-parallel-size" not in result.stdout


def test_moe_environment_does_not_leak(tmp_path, monkeypatch):
    """MOE / EP / TRAIN_ITERS exported in the shell do not reach a layout that has no such argument."""
    for name, value in (("EP", "4"), ("MOE", "true"), ("TRAIN_ITERS", "7"), ("GLOBAL_BATCH_SIZE", "64")):
        monkeypatch.setenv(name, value)
    v = values(tmp_path)
    result = dry_run("finetune", "llama", [v[n] for n in FINETUNE[next(iter(FINETUNE))][0].split()])
    assert result.returncode == 0, result.stderr
    assert "--expert-model-parallel-size" not in result.stdout and flag(result.stdout, "--epochs") == "2"
    assert flag(result.stdout, "--global-batch-size") == "1"


def test_moe_family_table_matches_the_registry():
    """common.sh's MoE families (and their load-balancing weight) are the registry's, with HF's router_aux_loss_coef."""
    from megatron_patch.models import get_family
    from megatron_patch.models.registry import supported_families

    out = subprocess.run(["bash", "-c", f"source {ROOT}/examples/common.sh; for f in \"${{!MP_MOE_AUX_LOSS_COEFF[@]}}\"; "
                          "do echo $f ${MP_MOE_AUX_LOSS_COEFF[$f]}; done"], capture_output=True, text=True, timeout=30)
    table = dict(line.split() for line in out.stdout.splitlines())
    moe = {name for name in supported_families()
           if get_family(name).arch_from_hf(next(iter(get_family(name).flavors.values()))).is_moe}
    assert set(table) == moe == {"qwen_moe", "mixtral"}
    for name, coeff in table.items():
        assert {get_family(name).flavor(size)["router_aux_loss_coef"] for size in get_family(name).flavors} == {float(coeff)}
    for name in moe:
        for kind in ("pretrain", "finetune", "text_generation"):
            assert (ROOT / "examples" / name / f"run_{kind}_megatron_{name}.sh").is_file()


@pytest.mark.slow
def test_moe_script_trains_at_ep2(make_hf, tmp_path):
    """The MoE pretraining script for real (ENV=cpu, EP=2: two ranks), 3 steps on a tiny Qwen2-MoE: the log carries
    the load-balancing loss and the expert load; the checkpoint lands under the run name ending in -ep2."""
    import json
    import sys

    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.data.indexed import build_indexed_dataset
    from megatron_patch.models.tiny import CORPUS

    hf = make_hf("moe_train_qwen2_moe", family="qwen_moe")
    hf_to_mcore(hf, tmp_path / "mcore")
    with open(tmp_path / "c.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": line}) + "\n" for line in CORPUS.read_text().splitlines() if line.strip())
    build_indexed_dataset(str(tmp_path / "c.jsonl"), tmp_path / "c_text_document", hf, progress=False)
    v = {**moe_values(tmp_path), "BATCH_SIZE": "1", "GLOBAL_BATCH_SIZE": "4", "TP": "1", "EP": "2", "PR": "fp32",
         "AC": "none", "DO": "false", "SEQ_LEN": "64", "PAD_LEN": "64", "EXTRA_VOCAB_SIZE": "0", "SAVE_INTERVAL": "100",
         "DATASET_PATH": str(tmp_path / "c_text_document"), "PRETRAIN_CHECKPOINT_PATH": str(tmp_path / "mcore"),
         "TRAIN_TOKENS": str(4 * 64 * 3), "WARMUP_TOKENS": "0"}
    script = ROOT / "examples" / "qwen_moe" / "run_pretrain_megatron_qwen_moe.sh"
    result = subprocess.run(["bash", str(script), *[v[n] for n in MOE_PRETRAIN["EP after MOE"][0].split()]],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "iteration        3/       3" in line]
    assert lines and "load_balancing_loss:" in lines[0] and "expert load max/mean:" in lines[0], result.stdout
    saved = list((tmp_path / "out" / "checkpoint").glob("pretrain-qwen_moe-tiny-*-ep2/iter_0000003"))
    assert len(saved) == 1, list((tmp_path / "out" / "checkpoint").iterdir())
