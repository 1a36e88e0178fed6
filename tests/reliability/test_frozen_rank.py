"""A frozen rank ends the run with one line naming it, instead of a hang (issue 23, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_patch.runtime.distributed import free_port

from .conftest import TALLY

RANK = textwrap.dedent("""
    import datetime, os, signal, sys
    import torch, torch.distributed as dist
    from megatron_patch.errors import run_reporting_errors
    from megatron_patch.runtime.distributed import collective_timeouts_reported

    def work():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))  # slow starts on a busy machine
        group = dist.new_group(timeout=datetime.timedelta(minutes=0.05))  # the collectives' timeout under test
        dist.barrier(group)
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as by a debugger or a stuck driver
        with collective_timeouts_reported(0.05, grace_s=2):
            dist.all_reduce(torch.ones(3), group=group)

    sys.exit(run_reporting_errors(work))
""")


def test_a_stopped_rank_is_named_and_the_run_ends(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        _, err = ranks[0].communicate(timeout=240)  # a bound on a hang, not a timing assertion
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    TALLY["tried"] += 1
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
    assert ranks[0].returncode == 1 and "Traceback" not in err, err
    assert lines[-1] == ("error: rank 0: a collective did not complete within --distributed-timeout-minutes 0.05: "
                         "rank(s) 1 stopped responding; ending the run"), err
    TALLY["refused cleanly"] += 1


@pytest.mark.parametrize("minutes", [0, -1])
def test_timeout_flag_is_checked(minutes):
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig.from_dict(dict(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="tok",
                                     data_path=["d"], train_iters=1, distributed_timeout_minutes=minutes))
    with pytest.raises(ValueError, match="--distributed-timeout-minutes must be > 0"):
        cfg.validate(1)


def test_seq_length_beyond_positions_is_refused_where_the_ranks_build_the_run():
    """Refused by resolve_model_source, which both ``train check`` and every rank's build_trainer call (a direct
    ``python -m megatron_patch.train pretrain`` skipped the launch scripts' check and ran on)."""
    from megatron_patch.errors import ConfigError
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.setup import resolve_model_source

    cfg = TrainConfig.from_dict(dict(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="tok",
                                     data_path=["d"], train_iters=1, seq_length=1 << 20)).validate(1)
    TALLY["tried"] += 1
    with pytest.raises(ConfigError, match="--seq-length 1048576 exceeds the .* positions"):
        resolve_model_source(cfg, None)
    TALLY["refused cleanly"] += 1
