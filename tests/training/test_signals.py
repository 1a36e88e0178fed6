"""SIGTERM and Ctrl-C on a 2-rank training run (real signals, the real launcher), and Megatron-LM's rules on resume.

SIGTERM to the launcher (what a scheduler sends before preempting): the ranks finish the iteration, save, exit 0
with one line. Ctrl-C to the whole process group (what a terminal does): one line naming the last saved iteration,
exit 130, no traceback. The same command resumes; a changed LR schedule is refused unless a flag says which wins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_patch.checkpoint.trusted_load import megatron_lm_args_globals
from megatron_patch.errors import ConfigError
from megatron_patch.runtime import free_port
from megatron_patch.training.arguments import TrainConfig
from megatron_patch.training.setup import build_scheduler, check_resumed_schedule, schedule_changes

ROOT = Path(__file__).resolve().parents[2]


def launch(ws, save: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_patch.torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_patch.train", "pretrain", "--load", ws["ckpt"],
           "--data-path", ws["data"], "--train-iters", "1000", "--global-batch-size", "2", "--seq-length", "64",
           "--split", "100,0,0", "--save", str(save)]
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_PATCH_VERBOSE"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={
        **env, "PYTHONPATH": str(ROOT)}, start_new_session=True)  # its own process group, as a terminal job


def read_until(proc: subprocess.Popen, marker: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError(f"the run ended before {marker!r}: {''.join(lines)[-3000:]}")


def finish(proc: subprocess.Popen, lines: list[str], timeout: float = 300) -> tuple[int, list[str]]:
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, rest.splitlines()


def test_sigterm_saves_and_exits_0_then_ctrl_c_says_where_to_resume(workspace, tmp_path):
    save = tmp_path / "save"
    proc, lines = launch(workspace, save), []
    read_until(proc, "iteration        2/", lines)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
    code, after = finish(proc, lines)
    text = "".join(lines) + "\n".join(after)
    assert code == 0, text[-3000:]
    stopped = [line for line in after if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and "Traceback" not in text, text[-3000:]
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 1000
    assert stopped[0] == (f"stopped by SIGTERM after iteration {saved}: saved {save}/iter_{saved:07d}; run the same "
                          f"command again (or --load {save}) to resume at iteration {saved}")

    # What Megatron-LM's --load reads from the saved iteration: its args, checkpoint_version and iteration.
    with torch.serialization.safe_globals(megatron_lm_args_globals()):
        common = torch.load(save / f"iter_{saved:07d}" / "common.pt", weights_only=True)
    assert common["iteration"] == saved and common["checkpoint_version"] == 3.0
    assert common["args"].consumed_train_samples == 2 * saved and common["args"].train_iters == 1000

    # The same command resumes there; Ctrl-C (SIGINT to every process of the job) stops it with one line.
    proc, lines = launch(workspace, save), []
    read_until(proc, f"resumed at iteration {saved}", lines)
    read_until(proc, f"iteration {saved + 1:8d}/", lines)
    os.killpg(proc.pid, signal.SIGINT)
    code, after = finish(proc, lines)
    text = "".join(lines) + "\n".join(after)
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text and "death signal" not in text, text[-3000:]
    said = [line for line in after if "interrupted (Ctrl-C)" in line]
    assert len(said) == 1 and f"the last checkpoint is iteration {saved} in {save}" in said[0], after
    assert len(after) <= 3, after  # the line, at most the iteration lines that were already under way


def scheduler_for(cfg: TrainConfig, train_iters: int):
    optimizer = SimpleNamespace(param_groups=[{"params": [], "lr": 0.0, "weight_decay": 0.0}])
    return build_scheduler(cfg, optimizer, train_iters)


def test_resumed_schedule_rules():
    """Megatron-LM's rule: the resumed run's LR schedule must be the checkpoint's unless a flag says which wins."""
    base = dict(mode="pretrain", data_path=["d"], train_iters=20, global_batch_size=4, lr=1e-3, load="x")
    saved = scheduler_for(TrainConfig(**base), 20).state_dict()
    check_resumed_schedule(TrainConfig(**base), saved, scheduler_for(TrainConfig(**base), 20))  # same: fine
    longer = TrainConfig(**{**base, "train_iters": 40})
    assert schedule_changes(saved, scheduler_for(longer, 40).state_dict(), 4) == [
        "--train-iters / --lr-decay-iters 40 (the checkpoint has 20 iterations)",
        "--train-iters 40 (the checkpoint has 20 iterations)"]
    with pytest.raises(ConfigError, match="--override-opt_param-scheduler to use the new values"):
        check_resumed_schedule(longer, saved, scheduler_for(longer, 40))
    for flag in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"):
        cfg = TrainConfig(**{**base, "train_iters": 40, flag: True})
        check_resumed_schedule(cfg, saved, scheduler_for(cfg, 40))
    both = TrainConfig(**{**base, "override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": True})
    with pytest.raises(ConfigError, match="exclusive"):
        both.validate()


def test_megatron_lm_spelling_of_the_scheduler_flags():
    from megatron_patch.train import build_parser

    args = build_parser().parse_args(["pretrain", "--override-opt_param-scheduler", "--data-path", "d"])
    assert args.override_opt_param_scheduler and not args.use_checkpoint_opt_param_scheduler
    args = build_parser().parse_args(["pretrain", "--use-checkpoint-opt-param-scheduler", "--data-path", "d"])
    assert args.use_checkpoint_opt_param_scheduler
