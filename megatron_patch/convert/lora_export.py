"""LoRA adapter checkpoints (training with ``--lora-rank``) -> HF: merged weights, or a PEFT adapter directory.

An adapter checkpoint holds only ``<linear>.lora.weight_a`` (A, rank x in) and ``<linear>.lora.weight_b`` (B, out x
rank) per targeted linear, as global (TP-merged) tensors in megatron's layout, and ``lora.json`` pointing to its
frozen base checkpoint.

``--merge-lora``: every targeted megatron weight becomes ``W + (alpha / rank) B A`` before the usual megatron -> HF
layout rows run; the HF directory loads in transformers as the base does.

``--lora-only``: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight``). A megatron linear may become several HF
linears (fused qkv -> q_proj, k_proj, v_proj; SwiGLU fc1 -> gate_proj, up_proj), each a selection of the fused
weight's rows (and, for no family here, of its columns). The selection is found by running the family's own export
rows on a tensor of row ids (and one of column ids): each HF linear gets the B rows and the A columns it is made of,
so ``B_hf A_hf`` is exactly its block of ``B A``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_output_dir, check_output_dir
from ..checkpoint.checksums import write_manifest
from ..checkpoint.hf import ShardedSafetensorsWriter, copy_assets
from ..checkpoint.megatron import assets_root
from ..checkpoint.torch_dist_io import TorchDistReader
from ..errors import CheckpointError
from ..layers.lora_config import read_lora_meta
from ..mapping.checks import all_finite
from ..models.checkpoint import Checkpoint

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def open_adapters(load: str | os.PathLike):
    """(adapter checkpoint, its LoRA record, the base checkpoint); refuses a checkpoint without adapters."""
    ckpt = Checkpoint.open(load)
    record = read_lora_meta(ckpt.iter_dir)
    if record is None:
        raise CheckpointError(f"{ckpt.iter_dir} holds no LoRA adapters (no lora.json): --merge-lora and --lora-only "
                              "need a checkpoint of a --lora-rank run")
    if not Path(record["base"]).is_dir():
        raise CheckpointError(f"the base checkpoint {record['base']} of the adapters in {ckpt.iter_dir} is missing")
    return ckpt, record["lora"], Checkpoint.open(record["base"])


def _target(entry) -> str | None:
    """The LoRA target an export entry's weight is, or None."""
    name = entry.global_name
    for target in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
        if name.endswith(f".{target}.weight"):
            return target
    return None


class Adapters:
    """Full adapter tensors of an adapter checkpoint, by the megatron weight they adapt."""

    def __init__(self, ckpt: Checkpoint, lora):
        self.reader, self.lora = TorchDistReader(ckpt.iter_dir), lora

    def has(self, entry) -> bool:
        return _target(entry) in self.lora.target_modules

    def pair(self, entry) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = entry.global_name.removesuffix(".weight")
        return (self.reader.full(f"{prefix}.lora.weight_a").float(),
                self.reader.full(f"{prefix}.lora.weight_b").float())

    def delta(self, entry) -> torch.Tensor:
        weight_a, weight_b = self.pair(entry)
        return (weight_b @ weight_a) * self.lora.scale


def _write_config_files(temp: Path, base: Checkpoint, ckpt: Checkpoint) -> dict:
    from .mcore_to_hf import export_config, generation_config  # lazy: mcore_to_hf imports this module

    owner = ckpt if ckpt.assets_dir is not None else base
    if owner.assets_dir is not None:  # a link out of the checkpoint is refused, as in mcore2hf
        copy_assets(owner.assets_dir, temp, assets_root(owner.iter_dir, owner.assets_dir))
    config = export_config(base.meta)
    (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (temp / "generation_config.json").is_file():
        (temp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    return config


def export_merged(load, save, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """HF weights of base + adapters (each targeted weight ``W + scale B A``, computed in fp32, stored in the base's
    dtype)."""
    ckpt, lora, base = open_adapters(load)
    check_output_dir(save, overwrite)
    sharding = base.sharding()
    reader = base.reader()
    adapters = Adapters(ckpt, lora)
    sharding.check_megatron_shapes(lambda entry: reader.meta(entry.global_name))

    def get_full(entry):
        weight = reader.full(entry.global_name)
        if not adapters.has(entry):
            return weight
        return (weight.float() + adapters.delta(entry)).to(weight.dtype)

    with atomic_output_dir(save, overwrite) as temp:
        _write_config_files(temp, base, ckpt)
        writer = ShardedSafetensorsWriter(temp, max_shard_bytes)
        for name, tensor in sharding.megatron_to_hf(get_full):
            if not all_finite(tensor):
                raise CheckpointError(f"merged tensor {name} holds NaN or Inf")
            writer.add(name, tensor)
        writer.close()
        write_manifest(temp)
    return Path(save)


def _selection(entry, arch, shape: tuple[int, int], dim: int) -> list[torch.Tensor]:
    """For each HF tensor of ``entry``: which rows (dim 0) or columns (dim 1) of the megatron weight it holds."""
    ids = torch.arange(shape[dim], dtype=torch.float64)
    ids = ids[:, None].expand(shape) if dim == 0 else ids[None, :].expand(shape)
    out = []
    for tensor in entry.row.megatron_to_hf(ids.contiguous(), arch):
        along = tensor[:, 0] if dim == 0 else tensor[0, :]
        spread = along[:, None] if dim == 0 else along[None, :]
        # A pure selection: every element of a selected row (column) carries that row's (column's) id.
        if tensor.dim() != 2 or not torch.equal(tensor, spread.expand_as(tensor)):
            raise CheckpointError(f"{entry.global_name}: its HF layout is not a selection of rows and columns; "
                                  "export the merged weights (--merge-lora) instead")
        out.append(along.long())
    return out


def peft_module_name(hf_weight_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj``."""
    return "base_model.model." + hf_weight_name.removesuffix(".weight")


def export_peft_adapter(load, save, overwrite: bool = False, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT LoRA adapter directory that ``peft.PeftModel.from_pretrained(base_hf_model, save)`` loads."""
    from safetensors.torch import save_file

    ckpt, lora, base = open_adapters(load)
    check_output_dir(save, overwrite)
    sharding = base.sharding()
    adapters = Adapters(ckpt, lora)
    tensors, hf_targets = {}, set()
    for entry in sharding.export_entries():
        if not adapters.has(entry):
            continue
        weight_a, weight_b = adapters.pair(entry)
        shape = (weight_b.shape[0], weight_a.shape[1])
        rows = _selection(entry, sharding.arch, shape, 0)
        cols = _selection(entry, sharding.arch, shape, 1)
        for hf_name, row_ids, col_ids in zip(entry.hf_names, rows, cols):
            module = peft_module_name(hf_name)
            tensors[f"{module}.lora_A.weight"] = weight_a[:, col_ids].contiguous()
            tensors[f"{module}.lora_B.weight"] = weight_b[row_ids].contiguous()
            hf_targets.add(hf_name.removesuffix(".weight").rsplit(".", 1)[-1])
    dtype = base.dtype if base.dtype.is_floating_point else torch.float32
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(hf_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    with atomic_output_dir(save, overwrite) as temp:
        save_file(tensors, str(temp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (temp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(temp)
    return Path(save)
