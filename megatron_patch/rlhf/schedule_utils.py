"""Small pieces the RLHF trainers (reward model, DPO, PPO) share around megatron-core's pipeline schedules."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..checkpoint.megatron import TRACKER, find_iteration_dir
from ..runtime.device import local_device


def collective_device() -> torch.device:
    """Where tensors handed to collectives live: the local GPU under NCCL, the CPU under gloo (the device helper's
    answer, so the strict device check sees them where a GPU run would put them)."""
    return local_device()


def pairs_to_rows(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """``(k, 2, ...)`` items of ``PreferenceDataset`` -> ``(2k, ...)`` rows (``k`` chosen, then ``k`` rejected)."""
    return {key: value.transpose(0, 1).reshape(-1, *value.shape[2:]).to(device) for key, value in batch.items()}


def reduce_sums(reduced: list[dict], key: str, size: int) -> torch.Tensor:
    """Sum the ``key`` vectors the last pipeline stage's loss functions reported, over micro-batches and data-parallel
    ranks, and share the result with every pipeline stage. Returns a float64 vector of ``size`` on every rank."""
    sums = torch.zeros(size, dtype=torch.float64, device=collective_device())
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            sums += item[key].detach().double()
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    return sums.cpu()


def find_resume_dir(save: str | None):
    """The last checkpoint under ``--save`` when a previous run of this job wrote one (then the run resumes from
    it, as the training loop does), else None."""
    if save and (Path(save) / TRACKER).is_file():
        return find_iteration_dir(save)
    return None
