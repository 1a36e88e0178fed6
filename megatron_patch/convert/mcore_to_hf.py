"""Megatron checkpoint (either format, any TP x PP, release or iter_NNNNNNN) -> HF directory."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..runtime.progress import progress as progress_bar
from .hf_io import StreamingSafetensorsWriter, copy_assets
from .mcore_io import (
    ASSETS,
    LegacyReader,
    atomic_output_dir,
    check_output_dir,
    plan_from_meta,
    read_meta,
    resolve_checkpoint,
)
from .torch_dist import TorchDistReader


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
    """Convert in one process, one parameter at a time: memory holds one parameter (and, for legacy input, the
    pages of the current pipeline stage's files), never the model. Every tensor's presence and shape is checked
    before the first byte is written."""
    iter_dir = resolve_checkpoint(load)
    meta = read_meta(iter_dir)
    plan = plan_from_meta(meta)
    check_output_dir(save, overwrite)
    if meta["format"] == "legacy":
        reader = LegacyReader(iter_dir, plan, meta["transformer_impl"])
        dtype = None  # legacy files keep each tensor's own dtype
    else:
        reader = TorchDistReader(iter_dir)
        dtype = getattr(torch, meta["dtype"])  # as a model built with the checkpoint's dtype would load it

    def get_full(entry, meta_only=False):
        tensor = reader.meta(entry.global_name) if meta_only else reader.full(entry.global_name)
        return tensor if dtype is None else tensor.to(dtype)

    # The HF names, dtypes and shapes, from running the export on meta tensors: validates every source tensor
    # before any work and lets the writer stream (it writes each file's header first).
    plan.check_megatron_shapes(functools.partial(get_full, meta_only=True))
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in plan.megatron_to_hf(functools.partial(get_full, meta_only=True))]

    config = export_config(meta)
    with atomic_output_dir(save, overwrite) as temp:
        assets = iter_dir / ASSETS
        if assets.is_dir():
            copy_assets(assets, temp)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (temp / "generation_config.json").is_file():
            (temp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        writer = StreamingSafetensorsWriter(temp, layout, max_shard_bytes)
        with progress_bar(total=len(plan.export_entries()), desc="mcore2hf", unit="tensor") as progress:
            for name, tensor in plan.megatron_to_hf(get_full, progress):
                writer.add(name, tensor)
        writer.close()
    return Path(save)
