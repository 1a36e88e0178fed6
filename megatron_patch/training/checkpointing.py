"""Training checkpoints in Megatron-LM's layout, written atomically.

``<save>/iter_NNNNNNN/`` holds:
  - the model as a megatron-core torch_dist checkpoint (the same as ``hf2mcore`` writes, so ``mcore2hf`` and
    ``--load`` read it at any TP x PP),
  - ``train_state/``: a second torch_dist checkpoint with the optimizer, the LR scheduler, the iteration, the
    consumed samples and every rank's RNG state (kept apart so the weights-only readers never see it),
  - ``megatron_patch.json`` + ``hf_assets/`` (what mcore2hf needs) and ``train_config.json``.

Atomicity: all ranks write into ``<save>/.iter_NNNNNNN.tmp``; rank 0 renames it to ``iter_NNNNNNN`` once every
rank has finished, and only then rewrites ``latest_checkpointed_iteration.txt`` (itself via a temp file and
``os.replace``). A process killed mid-save leaves the tracker on the previous, complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.hf import copy_assets
from ..checkpoint.megatron import ASSETS, TRACKER, iteration_dir_name
from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from ..models.checkpoint import Checkpoint, write_checkpoint_meta

TRAIN_STATE = "train_state"


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_train_samples: int = 0


def _numpy_state_as_tensors(state: tuple) -> tuple:
    """numpy's RNG state with its key array as a tensor: the checkpoint then loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rank_object(key: str, obj):
    """A per-rank object in a dist checkpoint, addressed by (pp, tp, dp) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject(key, obj, shape, offset, replica_id=0)


def _train_state_dict(model, optimizer, scheduler, state: TrainerState, is_loading: bool) -> dict:
    model_sd = model.module.sharded_state_dict()
    return {
        # dp_reshardable: each DP rank writes its own distributed-optimizer shard as is (no gather); the plain
        # optimizer ignores the setting.
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                  metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "rng_state": _rank_object("megatron_patch/rng_state", _rng_state()),
    }


def _write_tracker(save: Path, iteration: int) -> None:
    tmp = save / f".{TRACKER}.tmp"
    tmp.write_text(str(iteration))
    os.replace(tmp, save / TRACKER)


def save_checkpoint(save: str | os.PathLike, iteration: int, model, optimizer, scheduler, state: TrainerState,
                    source, cfg, after_model_save=None) -> Path:
    """Save on every rank (collective); returns the final iteration directory.

    ``after_model_save(tmp_dir)`` runs on rank 0 once everything is written, before the rename makes the checkpoint
    visible: a caller adds its own files there (the reward model its marker) and they appear atomically with it.
    """
    from megatron.core import dist_checkpointing

    save = Path(save)
    name = iteration_dir_name(iteration)
    final, tmp = save / name, save / f".{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by an interrupted save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.module.sharded_state_dict(), str(tmp))
    if rank == 0:
        (tmp / TRAIN_STATE).mkdir()
    dist.barrier()
    dist_checkpointing.save(_train_state_dict(model, optimizer, scheduler, state, False), str(tmp / TRAIN_STATE))
    dist.barrier()
    if rank == 0:
        dtype = next(model.module.parameters()).dtype
        write_checkpoint_meta(tmp, source.spec, fmt="torch_dist", tp=cfg.tensor_model_parallel_size,
                              pp=cfg.pipeline_model_parallel_size, transformer_impl=cfg.transformer_impl, dtype=dtype,
                              iteration=iteration, ep=cfg.expert_model_parallel_size)
        if source.assets_dir is not None:
            copy_assets(source.assets_dir, tmp / ASSETS)
        cfg.write(tmp)
        if after_model_save is not None:
            after_model_save(tmp)
        if final.exists():
            old = save / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_tracker(save, iteration)
    dist.barrier()
    return final


def has_train_state(iter_dir: Path) -> bool:
    return (Path(iter_dir) / TRAIN_STATE).is_dir()


def load_weights(model, iter_dir: Path) -> dict:
    """Weights only (a converted checkpoint, or --finetune); strict: every parameter must be in the checkpoint."""
    ckpt = Checkpoint.open(iter_dir)
    ckpt.load_into(model.module)
    return ckpt.meta


def _materialise_distributed_optimizer_state(optimizer) -> None:
    """The distributed optimizer describes its shards from existing Adam state, which appears only after a first
    step: take one step with lr = 0 (weights unchanged) so a checkpoint can be loaded into it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            saved = [(group["lr"], group["weight_decay"]) for group in opt.optimizer.param_groups]
            for group in opt.optimizer.param_groups:
                group["lr"], group["weight_decay"] = 0.0, 0.0
            with torch.no_grad():
                opt._init_optimizer_states_with_dummy_values()
            for group, (lr, wd) in zip(opt.optimizer.param_groups, saved):
                group["lr"], group["weight_decay"] = lr, wd


def _restore_adam_steps(optimizer) -> None:
    """Put the saved Adam step count back into every parameter's state after a distributed-optimizer load.

    Without Apex or Transformer Engine, megatron-core 0.16's DistributedOptimizer records the step in its param
    groups when saving, but loading a ``dp_reshardable`` checkpoint leaves each parameter's torch-Adam ``step`` at
    the value it had before the load (1 after the state was materialised), so Adam's bias correction restarts and
    the resumed run drifts (loss 5e-2 .. 1.5e-1 off the uninterrupted run within 3 steps; measured, gloo and any
    machine without Apex/TE alike). Each parameter gets its own tensor: torch's Adam increments it in place.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    old = state["step"]
                    state["step"] = torch.full_like(old, float(group["step"]))


def load_train_state(iter_dir: Path, model, optimizer, scheduler, load_optim: bool = True,
                     load_rng: bool = True) -> TrainerState:
    from megatron.core import dist_checkpointing

    if load_optim:
        _materialise_distributed_optimizer_state(optimizer)
    template = _train_state_dict(model, optimizer, scheduler, TrainerState(), is_loading=True)
    if not load_optim:
        template.pop("optimizer")
    if not load_rng:
        template.pop("rng_state")
    check_torch_dist_checkpoint(Path(iter_dir) / TRAIN_STATE)  # megatron-core unpickles without restriction
    loaded = dist_checkpointing.load(template, str(Path(iter_dir) / TRAIN_STATE))
    if load_optim:
        with torch.no_grad():  # fp32 distributed optimizer: its main params are views of the model's leaves
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    return TrainerState(int(loaded["iteration"]), int(loaded["consumed_train_samples"]))
