"""A full or read-only disk and damaged torch_dist files end in one line naming the path (issue 23, item 5)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from megatron_patch.checkpoint.bulk_file import BulkFile
from megatron_patch.checkpoint.trusted_load import check_torch_dist_checkpoint
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.errors import CheckpointError, ConfigError, MachineSupportError, run_reporting_errors

from .conftest import TALLY, refused


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["hf2mcore", "mcore2hf"])
def test_a_full_disk_is_one_line_and_leaves_nothing(converted, make_hf, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(BulkFile, "write", disk_full)
    monkeypatch.setattr(BulkFile, "write_all", disk_full)
    load = make_hf("reliability-shared") if command == "hf2mcore" else str(converted)
    code = convert_main([command, "--load", load, "--save", str(tmp_path / "out")])
    refused(code, capsys, f"cannot write --save {tmp_path / 'out'}: No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("number", [errno.EROFS, errno.EDQUOT])
def test_storage_errors_are_reported_in_one_line(capsys, number):
    def action():
        raise OSError(number, os.strerror(number), "/data/out/model.safetensors")

    refused(run_reporting_errors(action), capsys, f"cannot write /data/out/model.safetensors: {os.strerror(number)}")


def test_other_os_errors_keep_their_traceback():
    def action():
        raise OSError(errno.EIO, "an I/O error from a bug or a broken disk")

    with pytest.raises(OSError):
        run_reporting_errors(action)


def test_a_failed_training_save_is_one_line(tmp_path, monkeypatch):
    """DCP reports a failed write (here the one a full disk gave: torch's writer 'unexpected pos') on every rank."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_patch.training.checkpointing import _dcp_save

    def failing_save(state, directory):
        failure = RuntimeError("Worker failure: [enforce fail] unexpected pos 704 vs 598")
        raise CheckpointException("write", {0: _wrap_exception(failure)})

    monkeypatch.setattr(dist_checkpointing, "save", failing_save)
    TALLY["tried"] += 1
    with pytest.raises(MachineSupportError, match=r"cannot write the checkpoint into --save .* bytes free there\): "
                                                  r".*unexpected pos 704 vs 598; free space"):
        _dcp_save({}, tmp_path / ".iter_0000001.tmp", tmp_path)
    TALLY["refused cleanly"] += 1


def damage(ckpt: Path, how: str) -> None:
    release = ckpt / "release"
    if how == "truncated":
        data = (release / "__0_0.distcp").read_bytes()
        (release / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif how == "missing":
        (release / "__0_0.distcp").unlink()
    else:
        (release / "common.pt").unlink()


@pytest.mark.parametrize("how,expected", [
    ("truncated", r"data file __0_0.distcp is truncated \(\d+ of at least \d+ bytes\)"),
    ("missing", "data file __0_0.distcp is missing"),
    ("no-common", "has no common.pt"),
])
def test_damaged_torch_dist_is_named_before_megatron_core_reads_it(ckpt, how, expected):
    """What training, generation and the reward model run before megatron-core's load (which failed with
    PytorchStreamReader / EOFError / FileNotFoundError tracebacks)."""
    damage(ckpt, how)
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match=expected):
        check_torch_dist_checkpoint(ckpt / "release")
    TALLY["refused cleanly"] += 1


@pytest.mark.parametrize("kw,message", [
    (dict(adam_beta2=1.5), r"--adam-beta2 must be in \[0, 1\) \(got 1.5\)"),
    (dict(weight_decay=-0.1), "--weight-decay must be >= 0"),
    (dict(eval_iters=-1), "--eval-iters must be >= 0"),
    (dict(split="0"), "--split must be up to three weights"),
    (dict(split="garbage"), "--split must be up to three weights"),
    (dict(split="1,1,1,1"), "--split must be up to three weights"),
])
def test_training_numbers(kw, message):
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig.from_dict(dict(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="tok",
                                     data_path=["d"], train_iters=1, **kw))
    TALLY["tried"] += 1
    with pytest.raises(ConfigError, match=message):
        cfg.validate(1)
    TALLY["refused cleanly"] += 1
