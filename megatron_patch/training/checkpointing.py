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

from ..checkpoint.checksums import hash_file, remember, verify_manifest, write_manifest
from ..checkpoint.hf import copy_assets
from ..checkpoint.megatron import ASSETS, TRACKER, assets_root, iteration_dir_name
from ..checkpoint.megatron_lm_args import load_model_state
from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from ..errors import CheckpointError, ConfigError, MachineSupportError
from ..layers.lora import has_lora, lora_adapters, without_adapters
from ..layers.lora_config import LORA_KEY, read_lora_meta, write_lora_meta
from ..models.checkpoint import Checkpoint, write_checkpoint_meta
from ..runtime.helpers import checkpoint_writer_queue_dies_with_parent

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


def source_assets_root(source) -> Path:
    """Where the files of ``source.assets_dir`` must lie: inside the --load checkpoint for its ``hf_assets/``."""
    if source.checkpoint is None:
        return Path(source.assets_dir)
    return assets_root(source.checkpoint.iter_dir, source.assets_dir)


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
    checkpoint_writer_queue_dies_with_parent()  # a killed rank leaves no writer helper behind
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
    _dcp_save(model_state_to_save(model.module), tmp, save)
    _hash_own_files(tmp)
    if rank == 0:
        (tmp / TRAIN_STATE).mkdir()
    dist.barrier()
    _dcp_save(_train_state_dict(model, optimizer, scheduler, state, False), tmp / TRAIN_STATE, save)
    _hash_own_files(tmp / TRAIN_STATE)
    dist.barrier()
    if rank == 0:
        dtype = next(model.module.parameters()).dtype
        write_checkpoint_meta(tmp, source.spec, fmt="torch_dist", tp=cfg.tensor_model_parallel_size,
                              pp=cfg.pipeline_model_parallel_size, transformer_impl=cfg.transformer_impl, dtype=dtype,
                              iteration=iteration, ep=cfg.expert_model_parallel_size,
                              run={**cfg.to_dict(), "consumed_train_samples": state.consumed_train_samples},
                              tokenizer_dir=(final / ASSETS).resolve() if source.assets_dir is not None else None)
        if source.assets_dir is not None:  # checked at the start too (training.setup): a link out is refused
            copy_assets(source.assets_dir, tmp / ASSETS, source_assets_root(source))
        cfg.write(tmp)
        if has_lora(model.module):
            write_lora_meta(tmp, cfg.lora_config(), lora_base(source.checkpoint.iter_dir))
        if after_model_save is not None:
            after_model_save(tmp)
        # the .distcp digests come from their writers (_hash_own_files); the small files are hashed here
        write_manifest(tmp / TRAIN_STATE)
        write_manifest(tmp)  # the weights and metadata; train_state/ has its own (weights-only loads skip it)
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


def _hash_own_files(directory: Path) -> None:
    """Each rank hashes the ``.distcp`` files it has just written (DCP names them ``__<rank>_<n>.distcp``), from its
    page cache, and rank 0 keeps every rank's digests for the checksum manifest: rank 0 alone reading the whole
    optimizer state again would keep every other rank waiting. A file no rank claims is hashed by rank 0."""
    rank = dist.get_rank()
    mine = {str(path.absolute()): hash_file(path) for path in sorted(Path(directory).glob(f"__{rank}_*.distcp"))}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        for digests in gathered:
            for path, (size, digest) in digests.items():
                remember(path, size, digest)


def model_state_to_save(module) -> dict:
    """The model part of a training checkpoint: every weight, or with LoRA only the adapters (the frozen base is
    the --load checkpoint, which ``lora.json`` points to)."""
    state = module.sharded_state_dict()
    if has_lora(module):
        state = {key: value for key, value in state.items() if LORA_KEY in key}
    return state


def lora_base(iter_dir: Path) -> Path:
    """The full-weight checkpoint an adapter run trains on: ``iter_dir`` itself, or the base an adapter checkpoint
    points to."""
    meta = read_lora_meta(iter_dir)
    return Path(iter_dir) if meta is None else meta["base"]


def _dcp_save(state_dict: dict, directory: Path, save: Path) -> None:
    """megatron-core's save, with a failed write (a full or read-only disk: DCP reports it on every rank as a
    CheckpointException around the writer's message) as one line naming --save; the partial directory stays for
    the next save to remove, as after a kill."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dist_checkpointing.save(state_dict, str(directory))
    except CheckpointException as error:
        free = shutil.disk_usage(save).free
        reason = next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), "")
        raise MachineSupportError(f"cannot write the checkpoint into --save {save} ({free} bytes free there): "
                                  f"{reason[:200]}; free space or choose a writable --save") from None


def has_train_state(iter_dir: Path) -> bool:
    return (Path(iter_dir) / TRAIN_STATE).is_dir()


def load_weights(model, iter_dir: Path) -> dict:
    """Weights only (a converted checkpoint, or --finetune) into ``model`` (megatron-core DDP); see
    ``load_module_weights``."""
    return load_module_weights(model.module, iter_dir)


def load_module_weights(module, iter_dir: Path) -> dict:
    """Weights only into a model stage; strict: every parameter must be in the checkpoint.

    With LoRA: the base weights from the full checkpoint (``iter_dir`` or the base an adapter checkpoint points to),
    then, from an adapter checkpoint, every adapter; a fresh adapter run keeps its initial adapters.
    """
    lora_meta = read_lora_meta(iter_dir)
    if lora_meta is not None and not has_lora(module):
        raise ConfigError(f"{iter_dir} holds LoRA adapters (rank {lora_meta['lora'].rank}) on {lora_meta['base']}: "
                          "train it with the same --lora-* flags, or export it with mcore2hf --merge-lora")
    base = lora_base(iter_dir)
    if lora_meta is not None and not base.is_dir():
        raise CheckpointError(f"the base checkpoint {base} of the LoRA adapters in {iter_dir} is missing")
    ckpt = Checkpoint.open(base)
    with without_adapters(module):
        ckpt.load_into(module)
    if lora_meta is not None:
        _load_adapters(module, iter_dir, lora_meta["lora"])
    return ckpt.meta


def _load_adapters(module, iter_dir: Path, saved_lora) -> None:
    """Every adapter of ``module`` from an adapter checkpoint (strict both ways)."""
    ranks = {adapter.weight_a.shape[0] for _, adapter in lora_adapters(module)}
    targets = {name.rsplit(".", 2)[-2] for name, _ in lora_adapters(module)}
    if ranks != {saved_lora.rank}:
        raise ConfigError(f"--lora-rank {min(ranks)} differs from the rank {saved_lora.rank} of the adapters in "
                          f"{iter_dir}")
    if targets != set(saved_lora.target_modules):
        raise ConfigError(f"--lora-target-modules {' '.join(sorted(targets))} differs from the adapters in {iter_dir} "
                          f"({' '.join(saved_lora.target_modules)})")
    template = model_state_to_save(module)
    try:
        loaded = load_model_state(template, iter_dir)  # vetted first; common.pt's Megatron-LM keys left out
    except Exception as error:  # megatron-core raises several types for a missing key
        raise CheckpointError(f"the LoRA adapters in {iter_dir} do not match --lora-target-modules: "
                              f"{' '.join(str(error).split())[:300]}") from None
    params = {name: param for name, param in module.named_parameters() if LORA_KEY in f".{name}"}
    if set(loaded) != set(params):
        raise CheckpointError(f"the LoRA adapters in {iter_dir} do not match the model's: "
                              f"{sorted(set(loaded) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)


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
    verify_manifest(Path(iter_dir) / TRAIN_STATE)
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
