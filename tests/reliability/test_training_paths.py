"""Training checks its --load against its --save and vets the checkpoint before it writes anything (issue 23,
items 1 and 6): ``resolve_model_source`` runs in every rank before ``data_cache/`` or any file is written."""

from __future__ import annotations

import os
import pickle

import pytest

from megatron_patch.checkpoint.megatron import find_iteration_dir
from megatron_patch.errors import CheckpointError, OverlappingPathsError
from megatron_patch.training.arguments import TrainConfig
from megatron_patch.training.setup import resolve_model_source

from .conftest import TALLY


def cfg_for(ckpt, **kw) -> TrainConfig:
    return TrainConfig.from_dict(dict(mode="pretrain", load=str(ckpt), data_path=["d"], train_iters=1, **kw))


@pytest.mark.parametrize("save", ["same", "inside"])
def test_save_into_a_converted_load_is_refused(ckpt, save):
    target = ckpt if save == "same" else ckpt / "runs"
    before = sorted(p.name for p in ckpt.iterdir())
    TALLY["tried"] += 1
    with pytest.raises(OverlappingPathsError, match="holds no training state .*choose a new --save"):
        resolve_model_source(cfg_for(ckpt, save=str(target)), find_iteration_dir(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == before
    TALLY["refused cleanly"] += 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_a_bad_load_is_refused_before_anything_is_written(ckpt, tmp_path):
    """A .metadata payload was refused only at the weights' load, after data_cache/ had been written to --save."""
    metadata = pickle.loads((ckpt / "release" / ".metadata").read_bytes())
    metadata.planner_data = _Payload()
    (ckpt / "release" / ".metadata").write_bytes(pickle.dumps(metadata))
    TALLY["tried"] += 1
    with pytest.raises(CheckpointError, match="names 'posix.system'"):
        resolve_model_source(cfg_for(ckpt, save=str(tmp_path / "run")), find_iteration_dir(ckpt))
    assert not (tmp_path / "run").exists()
    TALLY["refused cleanly"] += 1
