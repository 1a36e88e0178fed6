"""toolkits/gpu_check.sh on a machine without a GPU: the dry run names every step's command, megatron-core is
installed from a wheel without network when it is not importable, and failures are one line each."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "toolkits" / "gpu_check.sh"
STEPS = ["install", "gpu", "tiny-hf", "hf2mcore", "verify", "data", "pretrain", "resume", "generate", "mcore2hf",
         "reward-model", "dpo", "ppo", "grpo", "rl-demo", "moe-convert", "moe-train", "benchmark", "benchmark-moe",
         "pytest-gpu"]


def run_check(*args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def result_lines(out: str) -> dict[str, str]:
    lines = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in {"PASS", "FAIL", "SKIP",
                                                                                              "DRY"}]
    return {line.split()[1]: line for line in lines}


def fake_wheel(folder: Path, version: str = "0.0.1") -> Path:
    """A minimal pure-Python wheel named like megatron-core's (pip installs it offline). Its ``megatron`` is a regular
    package, so that, installed in front, it wins over the one ``hidden_megatron`` puts on the path."""
    wheel = folder / f"megatron_core-{version}-py3-none-any.whl"
    info = f"megatron_core-{version}.dist-info"
    files = {
        "megatron/__init__.py": "",
        "megatron/core/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: megatron-core\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def hidden_megatron(folder: Path) -> str:
    """A PYTHONPATH entry under which ``import megatron.core`` fails, as on a machine without megatron-core."""
    package = folder / "hide" / "megatron"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("megatron-core is not installed here")\n')
    return f"{package.parent}:{ROOT}"


def test_dry_run_prints_one_line_per_step_with_the_positional_scripts(tmp_path):
    done = run_check("--dry-run", "--workdir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = result_lines(done.stdout)
    assert list(lines) == STEPS
    assert lines["install"].startswith("PASS install") and "megatron-core" in lines["install"]
    assert all(lines[step].startswith("DRY") for step in STEPS[1:])
    assert "model_convertor.sh none" in lines["hf2mcore"] and lines["hf2mcore"].rstrip().endswith("false")
    for step in ("pretrain", "resume"):
        assert "run_pretrain_megatron_llama.sh dsw none" in lines[step] and " bf16 1 1 " in lines[step]
    assert "--exit-interval\\ 15" in lines["pretrain"] and "exit-interval" not in lines["resume"]
    assert "run_text_generation_megatron_llama.sh dsw none" in lines["generate"]
    for step, script in (("reward-model", "reward_model"), ("dpo", "dpo"), ("ppo", "ppo"), ("grpo", "grpo")):
        assert f"rlhf/run_{script}_megatron_llama.sh dsw none" in lines[step] and " bf16 1 1 " in lines[step]
    assert "/rm/checkpoint" in lines["ppo"] or "/rm " in lines["ppo"]  # PPO scores with the trained reward model
    assert "fn:digit_match" in lines["grpo"] and "--eval-prompt-data-path" in lines["grpo"]
    assert "train_throughput.py" in lines["benchmark"] and "--profile" in lines["benchmark"]
    assert "megatron_patch.rlhf.examples.demo" in lines["rl-demo"]
    assert "tiny-hf" in lines["moe-convert"] and "qwen_moe" in lines["moe-convert"] and "verify" in lines["moe-convert"]
    # The MoE launch script's 26 arguments: MOE=true and EP=1 after TE (one GPU).
    assert "run_pretrain_megatron_qwen_moe.sh dsw" in lines["moe-train"] and " false true 1 10 " in lines["moe-train"]
    assert "--shape moe-gpu" in lines["benchmark-moe"]
    assert "tests/gpu" in lines["pytest-gpu"]


def test_installs_megatron_core_from_a_wheel_next_to_the_repo_without_network(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "0.0.7")
    env = {"PYTHONPATH": hidden_megatron(tmp_path), "MEGATRON_CORE_WHEEL_DIR": str(wheels), "PIP_NO_INDEX": "1"}
    work = tmp_path / "work"
    done = run_check("--dry-run", "--workdir", str(work), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    install = result_lines(done.stdout)["install"]
    assert install.startswith("PASS install") and "megatron-core 0.0.7 (wheel megatron_core-0.0.7" in install
    assert (work / "site" / "megatron" / "core" / "__init__.py").is_file()


def test_a_failed_step_is_one_line_and_skips_what_needs_it(tmp_path):
    env = {"PYTHONPATH": hidden_megatron(tmp_path), "MEGATRON_CORE_WHEEL_DIR": str(tmp_path)}
    done = run_check("--dry-run", "--workdir", str(tmp_path / "work"), env=env)
    assert done.returncode == 1
    lines = result_lines(done.stdout)
    assert lines["install"].startswith("FAIL install") and "no importable megatron-core" in lines["install"]
    assert all(lines[step].startswith("SKIP") for step in STEPS[1:])


def test_refuses_a_non_empty_workdir(tmp_path):
    (tmp_path / "something").write_text("x")
    done = run_check("--dry-run", "--workdir", str(tmp_path))
    assert done.returncode == 2 and "is not empty" in done.stderr
