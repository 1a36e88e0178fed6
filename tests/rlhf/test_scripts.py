"""RLHF launch scripts (dry run: validation names the bad argument, flags reach the entry point) and the entry
points' one-line refusal of bad preference data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["llama", "qwen", "baichuan", "bloom"]


def script_args(tmp_path, dpo: bool, **kw) -> list[str]:
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    args = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="tiny", BATCH_SIZE="2",
                GLOBAL_BATCH_SIZE="8", LR="1e-5", MIN_LR="1e-6", BETA="0.1", SEQ_LEN="256", PR="bf16", TP="2",
                PP="1", AC="sel", DO="false", FL="false", SP="false", TRAIN_DATASET_PATH=str(tmp_path / "p.jsonl"),
                VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH=str(tmp_path), EPOCH="2",
                OUTPUT_BASEPATH=str(tmp_path / "o"))
    if not dpo:
        args.pop("BETA")
    args.update(kw)
    return list(args.values())


def run_script(family: str, kind: str, args: list[str]):
    script = ROOT / "rlhf" / f"run_{kind}_megatron_{family}.sh"
    env = {**os.environ, "MP_DRY_RUN": "1"}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_and_dpo_flags(tmp_path, family):
    result = run_script(family, "reward_model", script_args(tmp_path, dpo=False))
    assert result.returncode == 0, result.stderr
    for flag in (f"--model-name {family}", "-m megatron_patch.rlhf.preference.train_reward_model", "--global-batch-size 8",
                 "--tensor-model-parallel-size 2", "--epochs 2", "--bf16", f"--load {tmp_path}", "--seq-length 256"):
        assert flag in result.stdout, (flag, result.stdout)
    result = run_script(family, "dpo", script_args(tmp_path, dpo=True))
    assert result.returncode == 0, result.stderr
    for flag in ("-m megatron_patch.rlhf.preference.dpo", "--dpo-beta 0.1", "--lr 1e-5"):
        assert flag in result.stdout, (flag, result.stdout)


@pytest.mark.parametrize("kind,override,message", [
    ("dpo", {"BETA": "0"}, "BETA must be > 0"),
    ("dpo", {"BETA": "x"}, "BETA must be a non-negative number"),
    ("reward_model", {"PRETRAIN_CHECKPOINT_PATH": "none"}, "PRETRAIN_CHECKPOINT_PATH must be an SFT or converted"),
    ("reward_model", {"TRAIN_DATASET_PATH": "/no/such.jsonl"}, "TRAIN_DATASET_PATH '/no/such.jsonl' is not a file"),
])
def test_bad_arguments_are_named(tmp_path, kind, override, message):
    result = run_script("llama", kind, script_args(tmp_path, dpo=kind == "dpo", **override))
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("module", ["megatron_patch.rlhf.preference.train_reward_model", "megatron_patch.rlhf.preference.dpo"])
def test_bad_preference_line_stops_the_entry_point_with_one_line(tmp_path, make_hf, module):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    ckpt = tmp_path / "mcore"
    hf_to_mcore(make_hf("rlhf_cli_tiny"), ckpt)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n")
    result = subprocess.run([sys.executable, "-m", module, "--load", str(ckpt), "--train-data-path", str(data),
                             "--seq-length", "32", "--save", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data}: line 2: 'chosen' is an empty response (pass --skip-bad-lines to skip such "
                      f"lines)"], result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_rl_input_stops_the_ppo_entry_point_with_one_line(tmp_path, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    ckpt = tmp_path / "mcore"
    hf_to_mcore(make_hf("rlhf_cli_tiny"), ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 2"}) + "\n" + json.dumps({"text": "3 4"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "megatron_patch.rlhf.ppo", "--load", str(ckpt), "--seq-length", "32",
                             "--prompt-data-path", str(prompts), "--reward", "count_up", "--max-new-tokens", "8",
                             "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "1",
                             "--save", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {prompts}: line 2: no key 'prompt' (keys: text)"], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def rl_script_args(tmp_path, algo: str, **kw) -> list[str]:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1 2 3"}\n')
    args = dict(ENV="cpu", MEGATRON_PATH="none", MEGATRON_PATCH_PATH=str(ROOT), MODEL_SIZE="tiny", BATCH_SIZE="2",
                GLOBAL_BATCH_SIZE="8", LR="1e-6", MIN_LR="0", CRITIC_LR="5e-6", KL_COEF="0.05", CLIP_RATIO="0.2",
                N_SAMPLES="4", SEQ_LEN="256", MAX_NEW_TOKENS="128", PR="bf16", TP="2", PP="1", AC="none", DO="false",
                FL="false", SP="false", PROMPT_DATASET_PATH=str(tmp_path / "prompts.jsonl"), REWARD="fn:count_up",
                PRETRAIN_CHECKPOINT_PATH=str(tmp_path), PTX_DATASET_PATH="none", PTX_COEF="0", TRAIN_ITERS="10",
                OUTPUT_BASEPATH=str(tmp_path / "o"))
    for name in (("N_SAMPLES",) if algo == "ppo" else ("CRITIC_LR", "PTX_DATASET_PATH", "PTX_COEF")):
        args.pop(name)
    args.update(kw)
    return list(args.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_and_grpo_flags(tmp_path, family):
    result = run_script(family, "ppo", rl_script_args(tmp_path, "ppo", REWARD=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    for flag in ("-m megatron_patch.rlhf.ppo", "--algo ppo", "--critic-lr 5e-6", f"--reward-model {tmp_path}",
                 "--global-batch-size 8", "--max-new-tokens 128", "--kl-coef 0.05", "--train-iters 10"):
        assert flag in result.stdout, (flag, result.stdout)
    result = run_script(family, "grpo", rl_script_args(tmp_path, "grpo"))
    assert result.returncode == 0, result.stderr
    for flag in ("--algo grpo", "--n-samples-per-prompt 4", "--reward count_up", "--clip-ratio 0.2"):
        assert flag in result.stdout, (flag, result.stdout)
    user = tmp_path / "my_reward.py"
    user.write_text("def score(prompt, response, answer):\n    return float(response == answer)\n")
    result = run_script(family, "grpo", rl_script_args(tmp_path, "grpo", REWARD=f"py:{user}:score"))
    assert result.returncode == 0 and f"--reward py:{user}:score" in result.stdout, result.stderr


@pytest.mark.parametrize("kind,override,message", [
    ("ppo", {"KL_COEF": "-1"}, "KL_COEF must be a non-negative number"),
    ("ppo", {"MAX_NEW_TOKENS": "256"}, "MAX_NEW_TOKENS (256) must be below SEQ_LEN"),
    ("ppo", {"PTX_COEF": "0.1"}, "PTX_COEF (0.1) > 0 needs PTX_DATASET_PATH"),
    ("ppo", {"REWARD": "/no/rm"}, "REWARD '/no/rm' must be a reward-model checkpoint, fn:<built-in reward> or py:"),
    ("grpo", {"REWARD": "py:/no/r.py:score"}, "REWARD 'py:/no/r.py:score': the file /no/r.py does not exist"),
    ("grpo", {"N_SAMPLES": "1"}, "N_SAMPLES must be an integer >= 2"),
    ("grpo", {"PROMPT_DATASET_PATH": "/no/p.jsonl"}, "PROMPT_DATASET_PATH '/no/p.jsonl' is not a file"),
])
def test_bad_rl_arguments_are_named(tmp_path, kind, override, message):
    result = run_script("llama", kind, rl_script_args(tmp_path, kind, **override))
    assert result.returncode == 2 and message in result.stderr, result.stderr
