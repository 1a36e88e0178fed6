"""HF directory -> Megatron checkpoint (torch_dist or legacy) sharded for TP x PP."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models import detect_family, get_family
from ..runtime.progress import progress as progress_bar
from .engine import ConversionPlan, te_name
from .hf_io import HFCheckpointReader, copy_assets, read_config
from .mcore_io import (
    ASSETS,
    FORMATS,
    TRACKER,
    atomic_output_dir,
    check_output_dir,
    save_legacy_rank,
    write_meta,
)
from .torch_dist import single_rank_plan, write_torch_dist


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
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)} (got {fmt})")
    if transformer_impl not in ("local", "transformer_engine"):
        raise ConfigError(f"--transformer-impl must be local or transformer_engine (got {transformer_impl})")
    if extra_vocab_size < 0:
        raise ConfigError(f"--extra-vocab-size must be >= 0 (got {extra_vocab_size})")
    if make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1 (got {make_vocab_size_divisible_by})")
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
            _save_torch_dist(plan, reader, iter_dir, dtype)
        copy_assets(hf_dir, iter_dir / ASSETS)
        write_meta(iter_dir, plan, fmt, transformer_impl, hf_config, dtype)
        (temp / TRACKER).write_text("release")
    return Path(out_dir)


def _save_legacy(plan: ConversionPlan, reader: HFCheckpointReader, iter_dir: Path, transformer_impl: str) -> None:
    """One rank file at a time: memory holds one rank's tensors. A rank reads only its part of each HF tensor
    (the tensors are views of memory-mapped files), so every byte is read once over all ranks."""
    rename = te_name if transformer_impl == "transformer_engine" else (lambda name: name)
    total = plan.tp * sum(len(plan.stage_entries(s)) for s in range(plan.pp))
    with progress_bar(total=total, desc="hf2mcore", unit="tensor") as progress:
        for pp_rank in range(plan.pp):
            for tp_rank in range(plan.tp):
                state_dict = {rename(name): shards[tp_rank]
                              for name, shards in plan.hf_to_megatron(reader, pp_rank, [tp_rank], progress)}
                save_legacy_rank(iter_dir, tp_rank, pp_rank, plan.pp, state_dict)
                del state_dict


def _save_torch_dist(plan: ConversionPlan, reader: HFCheckpointReader, iter_dir: Path, dtype: torch.dtype) -> None:
    """One process writes the whole torch_dist checkpoint (its tensors are TP/PP-independent): see torch_dist.py."""
    total = len(single_rank_plan(plan).stage_entries(0))
    with progress_bar(total=total, desc="hf2mcore", unit="tensor") as progress:
        write_torch_dist(plan, reader, iter_dir, dtype, progress)
