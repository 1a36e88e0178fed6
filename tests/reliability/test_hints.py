"""Hints that lead somewhere (issue 22, item 6): the line names what the user typed and the way out, once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_patch.errors import name_script_arguments
from megatron_patch.runtime.progress import progress

from .conftest import TALLY

ROOT = Path(__file__).resolve().parents[2]
CONVERTOR = ROOT / "toolkits" / "model_checkpoints_convertor" / "model_convertor.sh"
PREPROCESS = ROOT / "toolkits" / "pretrain_data_preprocessing" / "run_make_pretraining_dataset.sh"


def script(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MEGATRON_PATCH_SCRIPT_ARGS", None)
    return subprocess.run(["bash", str(path), *args], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, stream: str = "stderr") -> str:
    TALLY["tried"] += 1
    text = getattr(result, stream)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    TALLY["refused cleanly"] += 1
    return errors[0]


def script_table(path: Path, tmp_path: Path, *args: str) -> str:
    """The MEGATRON_PATCH_SCRIPT_ARGS a launch script hands to Python (an interpreter that prints it: no torch)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s" "$MEGATRON_PATCH_SCRIPT_ARGS"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_model_name_of_another_family_says_what_config_json_says(make_hf, tmp_path, monkeypatch, capsys):
    """MODEL_NAME=qwen-7b on a llama checkpoint reported a missing q_proj.bias (a qwen weight)."""
    from megatron_patch.convert.__main__ import main as convert_main

    hf, out = make_hf("hints-llama"), tmp_path / "out"
    table = script_table(CONVERTOR, tmp_path, "none", hf, str(out), "1", "1", "qwen-7b", "0", "false")
    monkeypatch.setenv("MEGATRON_PATCH_SCRIPT_ARGS", table)
    TALLY["tried"] += 1
    assert convert_main(["hf2mcore", "--load", hf, "--save", str(out), "--model-name", "qwen"]) == 1
    line = capsys.readouterr().err.strip()
    assert "config.json says LlamaForCausalLM" in line and "q_proj" not in line, line
    assert line.endswith("[the script's MODEL_NAME=qwen-7b]"), line
    assert not out.exists()
    TALLY["refused cleanly"] += 1


def test_model_name_check_keeps_a_matching_or_unknown_family(make_hf):
    from megatron_patch.models import get_family
    from megatron_patch.models.registry import check_named_family

    config = json.loads((Path(make_hf("hints-llama")) / "config.json").read_text())
    check_named_family(get_family("llama"), config)  # the family config.json names
    check_named_family(get_family("qwen"), {**config, "architectures": ["SomeNewForCausalLM"], "model_type": "new"})


def test_existing_output_names_the_script_way_to_overwrite(converted, make_hf, tmp_path, monkeypatch, capsys):
    from megatron_patch.convert.__main__ import main as convert_main

    hf = make_hf("hints-llama")
    table = script_table(CONVERTOR, tmp_path, "none", hf, str(converted), "1", "1", "llama", "0", "false")
    monkeypatch.setenv("MEGATRON_PATCH_SCRIPT_ARGS", table)
    TALLY["tried"] += 1
    assert convert_main(["hf2mcore", "--load", hf, "--save", str(converted)]) == 1
    line = capsys.readouterr().err.strip()
    assert "pass --overwrite" in line and line.endswith("[the script's MP_EXTRA_ARGS=--overwrite]"), line
    TALLY["refused cleanly"] += 1


def test_preprocessing_bad_line_names_skip_bad_lines_and_prints_no_warnings(make_hf, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "one"}\nnot json\n')
    result = script(PREPROCESS, str(ROOT), str(data), str(tmp_path / "out"), make_hf("hints-llama"), "text", "1")
    line = one_error_line(result)
    assert line.endswith("(pass --skip-bad-lines to skip such lines) [the script's SKIP_BAD_LINES=true]"), line
    # Nothing else on stderr: no third-party warning (Transformer Engine, CUDA, tokenizer advisories).
    assert result.stderr.splitlines() == [line], result.stderr
    assert not list(tmp_path.glob("out*"))


def test_script_arguments_named_once():
    table = "--overwrite=OVERWRITE=true\n--bf16=PR=fp8\n--fp8-format=PR=fp8"
    assert name_script_arguments("FP8: --bf16 without --fp8-format", table) == (
        "FP8: --bf16 without --fp8-format [the script's PR=fp8]")
    named = name_script_arguments("exists (pass --overwrite)", table)
    assert named == "exists (pass --overwrite) [the script's OVERWRITE=true]"
    assert name_script_arguments(named, table) == named  # a line named by the pre-flight is not named again
    assert name_script_arguments("--overwrite-all", table) == "--overwrite-all"  # whole flags only


def test_verify_prints_its_progress_line_once(monkeypatch, capsys, converted, make_hf):
    """A slow machine printed 'verify: logits: 1/2 model (50%) | 0.0 model/s' and then the closing line."""
    from megatron_patch.convert import verify as verify_module

    monkeypatch.setenv("MEGATRON_PATCH_PROGRESS_INTERVAL", "0")  # a line at every step, as 30 s on a slow machine
    logits = torch.zeros(1, 4, 8)
    monkeypatch.setattr(verify_module, "hf_logits", lambda *args: logits)
    monkeypatch.setattr(verify_module, "megatron_logits", lambda *args: [logits])
    monkeypatch.setattr(verify_module, "fixed_tokens", lambda *args, **kw: None)
    verify_module.verify(make_hf("hints-llama"), converted)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("verify: logits: 2/2 model (100%)"), lines


def test_slow_steps_read_as_seconds_per_step(monkeypatch):
    from megatron_patch.runtime import progress as progress_module

    clock = iter([0.0, 40.0, 80.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    with progress(total=2, desc="verify: logits", unit="model", stream=stream, interval=3600) as bar:
        bar.update(1)
    assert stream.getvalue() == "verify: logits: 1/2 model (50%) | 80.0 s/model | elapsed 0:01:20 | ETA 0:01:20\n"


def test_rlhf_export_says_what_it_wrote(monkeypatch, tmp_path, capsys):
    from megatron_patch.rlhf import export

    def fake_export(load, save, overwrite):  # the conversion itself is tested in tests/rlhf/test_reward_model.py
        Path(save).mkdir()
        (Path(save) / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
        return Path(save)

    monkeypatch.setattr(export, "reward_model_to_hf", fake_export)
    assert export.main(["--load", str(tmp_path / "rm"), "--save", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr()
    assert out.out == f"saved HF reward model (LlamaForSequenceClassification, one score) to {tmp_path / 'hf'}\n"
    assert out.err == ""
