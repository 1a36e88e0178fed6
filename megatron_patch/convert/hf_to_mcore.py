"""HF directory -> Megatron checkpoint (torch_dist or legacy) sharded for TP x PP."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from ..models import detect_family, get_family
from .engine import ConversionPlan, te_name
from .hf_io import HFCheckpointReader, copy_assets, read_config
from .mcore_io import (
    ASSETS,
    FORMATS,
    TRACKER,
    atomic_output_dir,
    check_output_dir,
    fill_model,
    save_legacy_rank,
    write_meta,
)


def make_plan(hf_config: dict, tp: int, pp: int, family_name: str | None = None, extra_vocab_size: int = 0,
              make_vocab_size_divisible_by: int = 128) -> ConversionPlan:
    family = get_family(family_name) if family_name else detect_family(hf_config)
    return ConversionPlan(
        family=family,
        arch=family.arch_from_hf(hf_config),
        tp=tp,
        pp=pp,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        extra_vocab_size=extra_vocab_size,
    )


def checkpoint_dtype(reader: HFCheckpointReader, plan: ConversionPlan) -> torch.dtype:
    """The dtype the weights are stored in (that of the word embedding), kept through the conversion."""
    first = plan.stage_entries(0)[0]
    return reader.dtype(first.hf_names[0])


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    fmt: str = "torch_dist",
    transformer_impl: str = "local",
    family: str | None = None,
    extra_vocab_size: int = 0,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> Path:
    """Convert; everything is validated before the first byte is written, and the output appears atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {fmt})")
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"--transformer-impl must be local or transformer_engine (got {transformer_impl})")
    hf_config = read_config(hf_dir)
    plan = make_plan(hf_config, tp, pp, family, extra_vocab_size, make_vocab_size_divisible_by)
    check_output_dir(out_dir, overwrite)
    reader = plan.open_hf(hf_dir)
    plan.validate_hf(reader)
    dtype = checkpoint_dtype(reader, plan)

    with atomic_output_dir(out_dir, overwrite) as temp:
        iter_dir = temp / "release"
        iter_dir.mkdir()
        if fmt == "legacy":
            _save_legacy(plan, reader, iter_dir, transformer_impl)
        else:
            _save_torch_dist(plan, hf_dir, iter_dir, dtype)
        copy_assets(hf_dir, iter_dir / ASSETS)
        write_meta(iter_dir, plan, fmt, transformer_impl, hf_config, dtype)
        (temp / TRACKER).write_text("release")
    return Path(out_dir)


def _save_legacy(plan: ConversionPlan, reader: HFCheckpointReader, iter_dir: Path, transformer_impl: str) -> None:
    """One stage at a time: each HF tensor is read once and split for all TP ranks of its stage."""
    rename = te_name if transformer_impl == "transformer_engine" else (lambda name: name)
    total = sum(len(plan.stage_entries(s)) for s in range(plan.pp))
    with tqdm(total=total, desc="hf2mcore", unit="tensor", disable=None) as progress:
        for pp_rank in range(plan.pp):
            state_dicts = [{} for _ in range(plan.tp)]
            for name, shards in plan.hf_to_megatron(reader, pp_rank, progress=progress):
                for tp_rank, shard in shards.items():
                    state_dicts[tp_rank][rename(name)] = shard
            for tp_rank, state_dict in enumerate(state_dicts):
                save_legacy_rank(iter_dir, tp_rank, pp_rank, plan.pp, state_dict)
            del state_dicts


def _save_torch_dist(plan: ConversionPlan, hf_dir, iter_dir: Path, dtype: torch.dtype) -> None:
    """torch_dist is written by megatron-core itself: one process per TP x PP rank saves its own shards."""
    from ..runtime import run_on_local_ranks

    args = (str(hf_dir), str(iter_dir), plan.family.name, plan.tp, plan.pp, plan.extra_vocab_size,
            plan.make_vocab_size_divisible_by, str(dtype).removeprefix("torch."))
    # Conversion is host work: keep the ranks off any GPU so it runs the same on a login node or a GPU box.
    run_on_local_ranks(_torch_dist_rank, plan.tp * plan.pp, *args, env={"CUDA_VISIBLE_DEVICES": ""})


def _torch_dist_rank(hf_dir, iter_dir, family, tp, pp, extra_vocab_size, divisible_by, dtype_name):
    from megatron.core import dist_checkpointing, parallel_state

    from ..models.builder import build_model, transformer_config
    from ..runtime import init_distributed

    init_distributed(tp, pp)
    plan = make_plan(read_config(hf_dir), tp, pp, family, extra_vocab_size, divisible_by)
    dtype = getattr(torch, dtype_name)
    config = transformer_config(plan.arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                params_dtype=dtype, perform_initialization=False)
    model = build_model(plan.arch, plan.padded_vocab_size, config=config)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    reader = plan.open_hf(hf_dir)
    show = tp_rank == 0 and pp_rank == 0
    with tqdm(total=len(plan.stage_entries(pp_rank)), desc="hf2mcore", unit="tensor", disable=None if show else True) as bar:
        tensors = ((name, shards[tp_rank]) for name, shards in plan.hf_to_megatron(reader, pp_rank, [tp_rank], bar))
        fill_model(model, tensors, f"hf2mcore rank tp{tp_rank} pp{pp_rank}")
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    return True
