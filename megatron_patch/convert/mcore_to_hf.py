"""Megatron checkpoint (either format, any TP x PP, release or iter_NNNNNNN) -> HF directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from .hf_io import ShardedSafetensorsWriter, copy_assets
from .mcore_io import (
    ASSETS,
    LegacyReader,
    atomic_output_dir,
    check_output_dir,
    load_checkpoint_into_model,
    plan_from_meta,
    read_meta,
    resolve_checkpoint,
)


def export_config(meta: dict) -> dict:
    """The HF config to write: the original one, with the vocabulary the checkpoint now has."""
    config = dict(meta["hf_config"])
    config["vocab_size"] = meta["vocab_size"]
    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    config[dtype_key] = meta["dtype"]
    return config


def generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: config[k] for k in keys if config.get(k) is not None}}


def mcore_to_hf(load: str | os.PathLike, save: str | os.PathLike, overwrite: bool = False,
                max_shard_bytes: int = 5 * 2**30) -> Path:
    iter_dir = resolve_checkpoint(load)
    meta = read_meta(iter_dir)
    plan = plan_from_meta(meta)
    check_output_dir(save, overwrite)
    if meta["format"] == "legacy":
        reader = LegacyReader(iter_dir, plan, meta["transformer_impl"])

        def get_full(entry):
            return reader.full(entry.global_name)
    else:
        state = _load_torch_dist_full(iter_dir, meta, plan)

        def get_full(entry):
            return state[entry.global_name]

    config = export_config(meta)
    with atomic_output_dir(save, overwrite) as temp:
        assets = iter_dir / ASSETS
        if assets.is_dir():
            copy_assets(assets, temp)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (temp / "generation_config.json").is_file():
            (temp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        writer = ShardedSafetensorsWriter(temp, max_shard_bytes)
        with tqdm(total=len(plan.export_entries()), desc="mcore2hf", unit="tensor", disable=None) as progress:
            for name, tensor in plan.megatron_to_hf(get_full, progress):
                writer.add(name, tensor)
        writer.close()
    return Path(save)


def _load_torch_dist_full(iter_dir: Path, meta: dict, plan) -> dict[str, torch.Tensor]:
    """Load a torch_dist checkpoint into a TP=1 PP=1 model in this process (dist_checkpointing reshards at load)
    and return its state dict: full tensors, global layer names, the checkpoint's dtype."""
    from ..models.builder import build_model, transformer_config
    from ..runtime import init_distributed

    if plan.pp > 1 or plan.tp > 1:
        plan = plan_from_meta(meta, tp=1, pp=1)
    init_distributed(1, 1)
    config = transformer_config(plan.arch, params_dtype=getattr(torch, meta["dtype"]), perform_initialization=False)
    model = build_model(plan.arch, plan.padded_vocab_size, config=config)
    load_checkpoint_into_model(model, iter_dir)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
