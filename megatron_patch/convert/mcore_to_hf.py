"""Megatron checkpoint (any registered format, any TP x PP, release or iter_NNNNNNN; ours, Megatron-LM's or
Megatron-Bridge's) -> HF directory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_output_dir, check_output_dir
from ..checkpoint.checksums import write_manifest
from ..checkpoint.hf import StreamingSafetensorsWriter, asset_files, copy_assets
from ..checkpoint.megatron import assets_root
from ..errors import CheckpointError, ConfigError
from ..layers.lora_config import read_lora_meta
from ..mapping.checks import NonFiniteGuard, all_finite
from ..models.checkpoint import Checkpoint
from ..runtime.progress import progress as progress_bar
from .lora_export import export_merged, export_peft_adapter


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


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread: the export's only torch work is the finiteness check of 1 MiB batches, and waking a
    second OpenMP thread per batch costs more than it saves (measured: 31 GB/s on one thread, 11 GB/s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mcore_to_hf(load: str | os.PathLike, save: str | os.PathLike, overwrite: bool = False,
                max_shard_bytes: int = 5 * 2**30, model_name: str | None = None,
                hf_config_dir: str | os.PathLike | None = None, allow_non_finite: bool = False,
                merge_lora: bool = False, lora_only: bool = False) -> Path:
    """Convert in one process, one parameter at a time: memory holds one parameter (and, for legacy input, the
    pages of the current pipeline stage's files), never the model. Every tensor's presence and shape is checked
    before the first byte is written; each HF tensor goes from the stored shards to the file as byte runs (no
merged or HF tensor is built, see ``mapping.pieces``). ``model_name`` / ``hf_config_dir`` serve checkpoints without
    ``megatron_patch.json`` (see ``models.foreign``). A NaN or Inf in an exported tensor stops the export (found as
    the tensor is written) unless ``allow_non_finite``, which warns once instead.

    A LoRA adapter checkpoint (training with ``--lora-rank``) needs ``merge_lora`` (base + adapters as one HF model)
    or ``lora_only`` (a PEFT adapter directory); see ``convert/lora_export.py``."""
    if merge_lora and lora_only:
        raise ConfigError("--merge-lora and --lora-only are exclusive")
    if merge_lora:
        return export_merged(load, save, overwrite, max_shard_bytes)
    if lora_only:
        return export_peft_adapter(load, save, overwrite)
    ckpt = Checkpoint.open(load, model_name=model_name, hf_config_dir=hf_config_dir)
    if read_lora_meta(ckpt.iter_dir) is not None:
        raise ConfigError(f"{ckpt.iter_dir} holds LoRA adapters only: export with --merge-lora (merged HF weights) or "
                          "--lora-only (a PEFT adapter directory)")
    assets = None if ckpt.assets_dir is None else assets_root(ckpt.iter_dir, ckpt.assets_dir)
    if assets is not None:
        asset_files(ckpt.assets_dir, assets)  # a link leading out of the checkpoint is refused now, not after work
    sharding = ckpt.sharding()
    check_output_dir(save, overwrite)
    reader = ckpt.reader()
    dtype = ckpt.format.export_dtype(ckpt.dtype)

    def get_meta(entry):
        tensor = reader.meta(entry.global_name)
        return tensor if dtype is None else tensor.to(dtype)

    def get_shards(entry):
        shards = reader.shards(entry.global_name)
        return shards if dtype is None else [shard.to(dtype) for shard in shards]

    # The HF names, dtypes and shapes, from running the export on meta tensors: validates every source tensor
    # (its stored dtype, before any cast) before any work and lets the writer stream (it writes each file's header
    # first).
    def stored(entry):
        tensor = reader.meta(entry.global_name)
        if dtype is not None and tensor.dtype != dtype:  # a cast would rewrite the weights (int8: all zeros)
            raise CheckpointError(f"checkpoint {ckpt.iter_dir}: '{entry.global_name}' is stored as {tensor.dtype}, "
                                  f"but megatron_patch.json says {dtype}")
        return tensor

    sharding.check_megatron_shapes(stored)
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in sharding.megatron_to_hf(get_meta)]

    config = export_config(ckpt.meta)
    with atomic_output_dir(save, overwrite) as temp:
        if ckpt.assets_dir is not None:
            copy_assets(ckpt.assets_dir, temp, assets)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (temp / "generation_config.json").is_file():
            (temp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        writer = StreamingSafetensorsWriter(temp, layout, max_shard_bytes)
        check_finite = NonFiniteGuard(f"checkpoint {ckpt.iter_dir}", allow_non_finite)
        with progress_bar(total=len(sharding.export_entries()), desc="mcore2hf", unit="tensor") as progress, \
                _one_torch_thread():
            for name, pieces in sharding.megatron_to_hf_pieces(get_shards, progress):

                def inspect(batch, name=name, pieces=pieces):
                    if not all_finite(batch):
                        check_finite(name, pieces)  # raises, or warns once, counting over the whole tensor

                writer.add(name, pieces, inspect)
        writer.close()
        write_manifest(temp)  # the shards' digests were taken as they were written
    return Path(save)
