"""HF directory -> Megatron checkpoint (any registered format) sharded for TP x PP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_output_dir, check_output_dir
from ..checkpoint.checksums import write_manifest
from ..checkpoint.formats import format_names, get_format
from ..checkpoint.hf import HFCheckpointReader, asset_files, copy_assets, read_config
from ..checkpoint.megatron import ASSETS, TRACKER, TRANSFORMER_IMPLS
from ..checkpoint.megatron_lm_args import megatron_lm_common
from ..errors import CheckpointError, ConfigError
from ..mapping.checks import NonFiniteGuard
from ..models.checkpoint import write_checkpoint_meta
from ..models.spec import ModelSpec
from ..runtime.progress import progress as progress_bar
from .plan import ConversionPlan

MAX_EXTRA_VOCAB = 1 << 22  # 4M new rows: 16x the largest vocabularies in use; beyond is a typo, not a tokenizer


def make_plan(hf_config: dict, tp: int, pp: int, family_name: str | None = None, extra_vocab_size: int = 0,
              make_vocab_size_divisible_by: int = 128, ep: int = 1) -> ConversionPlan:
    try:
        spec = ModelSpec.from_hf_config(hf_config, tp=tp, family=family_name, extra_vocab_size=extra_vocab_size,
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except KeyError as error:  # a family reads its fields by name
        raise CheckpointError(f"config.json has no field {error} that the model needs") from None
    except TypeError as error:  # a field of the wrong type (a string where a number belongs)
        raise CheckpointError(f"config.json has a field of the wrong type: {error}") from None
    experts = hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0
    if experts and not spec.arch.is_moe:
        raise ConfigError(f"config.json describes a mixture-of-experts model ({experts} experts) but --model-name "
                          f"{spec.family.name} is a dense family (omit --model-name to detect the family)")
    return ConversionPlan(spec, tp, pp, ep=ep)


def checkpoint_dtype(reader: HFCheckpointReader, plan: ConversionPlan) -> torch.dtype:
    """The dtype the weights are stored in (that of the word embedding), kept through the conversion."""
    first = plan.sharding.stage_entries(0)[0]
    dtype = reader.dtype(first.hf_names[0])
    other = [(name, reader.dtype(name)) for name in reader.names()
             if reader.dtype(name).is_floating_point and reader.dtype(name) != dtype]
    if other:  # e.g. one fp16 tensor in an fp32 model: it is cast like the rest, so say so
        kinds = ", ".join(sorted({str(kind).removeprefix("torch.") for _, kind in other}))
        print(f"warning: {reader.dir} mixes dtypes: {len(other)} tensor(s) are {kinds} (e.g. '{other[0][0]}'), the "
              f"rest {str(dtype).removeprefix('torch.')}; every weight is converted to "
              f"{str(dtype).removeprefix('torch.')}, the word embedding's dtype", file=sys.stderr)
    return dtype


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
    allow_non_finite: bool = False,
    ep: int = 1,
) -> Path:
    """Convert (``ep``: expert-parallel ranks of a MoE model; torch_dist stores experts by global index whatever it
    is, legacy writes one file per TP x PP x EP rank); everything is validated before the first byte is written, and the output appears atomically.

    Each megatron tensor is checked for NaN/Inf as it is built (one reduction over a fresh tensor, no extra pass
    over the checkpoint): the first one stops the conversion, or with ``allow_non_finite`` is reported once."""
    if fmt not in format_names():
        raise ConfigError(f"--format must be one of {', '.join(format_names())} (got {fmt})")
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"--transformer-impl must be local or transformer_engine (got {transformer_impl})")
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    if extra_vocab_size < 0:
        raise ConfigError(f"--extra-vocab-size must be >= 0 (got {extra_vocab_size})")
    if extra_vocab_size > MAX_EXTRA_VOCAB:
        raise ConfigError(f"--extra-vocab-size must be <= {MAX_EXTRA_VOCAB} (got {extra_vocab_size})")
    if make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1 (got {make_vocab_size_divisible_by})")
    storage = get_format(fmt)
    hf_config = read_config(hf_dir)
    asset_files(hf_dir)  # a link leading outside the model directory is refused now, not after the weights
    plan = make_plan(hf_config, tp, pp, family, extra_vocab_size, make_vocab_size_divisible_by, ep)
    if plan.arch.is_moe and transformer_impl != "local":
        raise ConfigError("mixture-of-experts checkpoints convert for --transformer-impl local only (megatron-core's "
                          "TE spec names a MoE layer's pre-MLP norm differently)")
    check_output_dir(out_dir, overwrite)
    reader = plan.open_hf(hf_dir)
    plan.validate_hf(reader)
    dtype = checkpoint_dtype(reader, plan)

    with atomic_output_dir(out_dir, overwrite) as temp:
        iter_dir = temp / "release"
        iter_dir.mkdir()
        with progress_bar(total=storage.write_steps(plan.sharding), desc="hf2mcore", unit="tensor") as progress:
            sharding = plan.sharding.with_tensor_check(NonFiniteGuard(f"HF checkpoint {hf_dir}", allow_non_finite))
            storage.write(sharding, reader, iter_dir, dtype=dtype, transformer_impl=transformer_impl,
                          progress=progress, megatron_lm=megatron_lm_common(
                              plan.spec, tp=tp, pp=pp, dtype=dtype, transformer_impl=transformer_impl,
                              iteration="release", tokenizer_dir=str(Path(out_dir).resolve() / "release" / ASSETS),
                              ckpt_format=fmt))
        copy_assets(hf_dir, iter_dir / ASSETS)
        write_checkpoint_meta(iter_dir, plan.spec, fmt=fmt, tp=tp, pp=pp, transformer_impl=transformer_impl,
                              dtype=dtype, tokenizer_dir=Path(out_dir).resolve() / "release" / ASSETS, ep=ep)
        write_manifest(iter_dir)  # the weight files' digests were taken as they were written
        (temp / TRACKER).write_text("release")
    return Path(out_dir)
