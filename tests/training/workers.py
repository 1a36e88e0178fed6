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
    import functools

    from megatron_patch.training import loop

    # This spawned process only: every save of the loop runs the kill between the shard writes and the rename.
    loop.save_checkpoint = functools.partial(loop.save_checkpoint, after_model_save=_die_during_save)
    return loop.run(cfg, quiet=True)


def load_logits_worker(ckpt: str, tokens: list[int]):
    """Logits of a checkpoint (TP1 PP1), to check a checkpoint is loadable and complete."""
    import torch

    from megatron_patch.models.builder import build_model
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed

    checkpoint = Checkpoint.open(ckpt)
    init_distributed(1, 1)
    model = build_model(checkpoint.spec.arch, checkpoint.spec.padded_vocab_size, parallel_output=False)
    checkpoint.load_into(model)
    return checkpoint.meta["iteration"], forward_logits(model, torch.tensor([tokens])).numpy()


def convert_back_worker(load: str, save: str, tokens: list[int]):
    """mcore2hf, then the checkpoint's own logits (megatron-core, TP1 PP1) to compare the HF model with."""
    from megatron_patch.convert.mcore_to_hf import mcore_to_hf

    mcore_to_hf(load, save)
    return load_logits_worker(load, tokens)


# --- misplacements planted into the training code, for the strict device check (tests/training/test_strict_device.py)


def _host_reduce_loss(reduced: list[dict]) -> float:
    """reduce_loss as it was before the device work: its accumulator on the bare default device (on a GPU, a CUDA
    loss added into a CPU tensor)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    pair = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            pair += item["lm loss"].double()
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    return float(pair[0] / pair[1].clamp(min=1.0))


def _forward_step_on_host_batch(data_iterator, model):
    """forward_step without moving the batch: token ids on the host meet the placed embedding."""
    from functools import partial

    from megatron_patch.training.loop import masked_loss

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_loss, batch["loss_mask"])


def planted_train_worker(cfg: dict, planted: str) -> list[tuple[int, float]]:
    from megatron_patch.training import loop, setup

    if planted == "host reduce_loss":
        loop.reduce_loss = _host_reduce_loss
    elif planted == "host batch":
        loop.forward_step = _forward_step_on_host_batch
    elif planted == "unplaced model":
        setup.place_model = lambda model: model
    else:
        raise ValueError(f"unknown planted mistake {planted}")
    return loop.run(cfg, quiet=True)


def lora_logits_worker(ckpt: str, tokens: list[int], lora: dict):
    """Logits of a LoRA adapter checkpoint (TP1 PP1): its base with its adapters, built and loaded as training does."""
    from types import SimpleNamespace

    import torch

    from megatron_patch.layers.lora_config import LoRAConfig
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed
    from megatron_patch.training.checkpointing import load_weights

    spec = Checkpoint.open(ckpt).spec
    init_distributed(1, 1)
    model = build_model(spec.arch, spec.padded_vocab_size, parallel_output=False, lora=LoRAConfig.from_dict(lora))
    load_weights(SimpleNamespace(module=model), Checkpoint.open(ckpt).iter_dir)
    model.eval()
    return forward_logits(model, torch.tensor([tokens])).numpy()
