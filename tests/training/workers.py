"""Module-level worker functions for run_on_local_ranks (importable by spawned processes)."""

from __future__ import annotations

import os


def train_worker(cfg: dict) -> list[tuple[int, float]]:
    from megatron_patch.training.loop import run

    return run(cfg, quiet=True)


def _die_during_save(tmp_dir) -> None:
    # Simulates a process killed after writing the shards of iteration 10 but before the rename.
    if tmp_dir.name == ".iter_0000010.tmp":
        import psutil

        # A SIGKILL takes the helper processes dist_checkpointing started with it; os._exit would orphan them.
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(3)


def train_and_die_worker(cfg: dict) -> list[tuple[int, float]]:
    from megatron_patch.training.loop import run

    return run(cfg, quiet=True, after_model_save=_die_during_save)


def load_logits_worker(ckpt: str, tokens: list[int]):
    """Logits of a checkpoint (TP1 PP1), to check a checkpoint is loadable and complete."""
    import torch

    from megatron_patch.convert.mcore_io import plan_from_meta, read_meta, resolve_checkpoint
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed
    from megatron_patch.training.checkpointing import load_checkpoint_into_model

    iter_dir = resolve_checkpoint(ckpt)
    meta = read_meta(iter_dir)
    plan = plan_from_meta(meta, tp=1, pp=1)
    init_distributed(1, 1)
    model = build_model(plan.arch, plan.padded_vocab_size, parallel_output=False)
    load_checkpoint_into_model(model, iter_dir)
    return meta["iteration"], forward_logits(model, torch.tensor([tokens])).numpy()


def convert_back_worker(load: str, save: str, tokens: list[int]):
    """mcore2hf, then the checkpoint's own logits (megatron-core, TP1 PP1) to compare the HF model with."""
    from megatron_patch.convert.mcore_to_hf import mcore_to_hf

    mcore_to_hf(load, save)
    return load_logits_worker(load, tokens)
