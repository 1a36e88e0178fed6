"""Module-level worker functions for run_on_local_ranks (importable by spawned processes)."""

from __future__ import annotations


def whiten_over_group_worker(values: list, mask: list) -> tuple[list, float]:
    """Each rank whitens its own rows over the world group; returns (its whitened rows, the global masked mean)."""
    import os

    import torch
    import torch.distributed as dist

    from megatron_patch.rlhf.core_algos import masked_mean, masked_whiten

    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    rows = torch.tensor(values[rank], dtype=torch.float32)
    row_mask = torch.tensor(mask[rank], dtype=torch.float32)
    group = dist.group.WORLD
    return masked_whiten(rows, row_mask, group=group).tolist(), float(masked_mean(rows, row_mask, group=group))
