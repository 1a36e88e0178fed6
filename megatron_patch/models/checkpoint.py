"""A Megatron checkpoint opened as a model: ``Checkpoint.open(path)`` resolves the tracker to the iteration
directory, reads and validates the metadata once, and returns its ``ModelSpec`` and storage format.

Lives in ``models`` (not ``checkpoint``) because turning metadata into a model needs the family registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.checksums import verify_manifest
from ..checkpoint.formats import CheckpointFormat, MegatronTensors, get_format
from ..checkpoint.megatron import ASSETS, META, find_iteration_dir, read_meta, write_meta
from ..checkpoint.megatron_lm_args import write_megatron_lm_common
from ..errors import CheckpointError
from ..mapping import Sharding
from ..mapping.checks import NonFiniteGuard
from .spec import ModelSpec


@dataclass(frozen=True)
class Checkpoint:
    """One iteration directory of a Megatron checkpoint.

    Attributes:
        iter_dir: ``release/`` or ``iter_NNNNNNN/``.
        meta: the validated ``megatron_patch.json`` (for a checkpoint of Megatron-LM or Megatron-Bridge: the same
            fields, built from what it records plus ``--model-name`` / ``--hf-config``).
        spec: the model it holds.
        format: its storage format (from the registry).
        assets_dir: tokenizer and config files (``hf_assets/``, or ``--hf-config`` for a foreign checkpoint), or
            None when it has none.
    """

    iter_dir: Path
    meta: dict
    spec: ModelSpec
    format: CheckpointFormat
    assets_dir: Path | None

    @classmethod
    def open(cls, path: str | os.PathLike, *, model_name: str | None = None,
             hf_config_dir: str | os.PathLike | None = None) -> Checkpoint:
        """Open the checkpoint at ``path`` (its root, or one iteration directory).

        ``model_name`` and ``hf_config_dir`` are read only for checkpoints this toolkit did not write (no
        ``megatron_patch.json``): the family and the HF config / tokenizer they do not record.
        """
        iter_dir = find_iteration_dir(path)
        verify_manifest(iter_dir)  # a checkpoint this toolkit wrote: every file as it was written (once a process)
        if (iter_dir / META).is_file():
            meta, where = read_meta(iter_dir), iter_dir / META
            assets = iter_dir / ASSETS
            assets_dir = assets if assets.is_dir() else None
        else:
            from .foreign import describe_foreign

            meta, where = describe_foreign(iter_dir, model_name, hf_config_dir)
            assets_dir = Path(hf_config_dir)
        fmt = get_format(meta["format"], where)
        try:
            spec = ModelSpec.from_meta(meta)
        except (ValueError, KeyError) as error:  # an unknown family, a config the family cannot represent
            raise CheckpointError(f"{where}: {' '.join(str(error).split())}") from None
        return cls(iter_dir, meta, spec, fmt, assets_dir)

    @property
    def tp(self) -> int:
        """The tensor-parallel size it was saved at."""
        return self.meta["tensor_model_parallel_size"]

    @property
    def pp(self) -> int:
        return self.meta["pipeline_model_parallel_size"]

    @property
    def ep(self) -> int:
        """The expert-parallel size it was saved at (1 for a dense model or a file without the field)."""
        return self.meta.get("expert_model_parallel_size", 1)

    @property
    def transformer_impl(self) -> str:
        return self.meta.get("transformer_impl", "local")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    def sharding(self, tp: int | None = None, pp: int | None = None, ep: int | None = None) -> Sharding:
        """The model's rows at TP x PP x EP (default: as saved)."""
        return self.spec.sharding(tp or self.tp, pp or self.pp, ep or self.ep)

    def reader(self) -> MegatronTensors:
        """Full megatron tensors, one parameter at a time (files validated first)."""
        return self.format.open_reader(self.iter_dir, self.sharding(), self.transformer_impl)

    def load_into(self, model: torch.nn.Module, allow_non_finite: bool = False) -> None:
        """Fill this rank's model stage (built for the current TP x PP, any saved TP x PP): every parameter must
        be found (only ``_extra_state`` may be absent), and hold no NaN/Inf unless ``allow_non_finite`` (then one
        warning). The finiteness check is one reduction per loaded parameter, on the device it was placed on."""
        from megatron.core import parallel_state as ps

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        ep = ps.get_expert_model_parallel_world_size() if self.spec.arch.is_moe else 1
        if ep > 1 and ps.get_expert_tensor_parallel_world_size() != tp:
            raise CheckpointError("loading a MoE checkpoint needs --expert-tensor-parallel-size equal to the "
                                  f"tensor-parallel size {tp}")
        self.format.load_into_model(model, self.iter_dir, self.sharding(), self.sharding(tp, pp, ep),
                                    ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                    self.transformer_impl,
                                    ep_rank=ps.get_expert_model_parallel_rank() if ep > 1 else 0)
        check_finite = NonFiniteGuard(f"checkpoint {self.iter_dir}", allow_non_finite)
        for name, parameter in model.named_parameters():
            check_finite(name, parameter)


def write_checkpoint_meta(iter_dir: str | os.PathLike, spec: ModelSpec, *, fmt: str, tp: int, pp: int,
                          transformer_impl: str, dtype: torch.dtype, iteration: int | str = "release",
                          run: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                          ep: int = 1) -> None:
    """Write ``megatron_patch.json``: what ``Checkpoint.open`` reads back; for torch_dist also what Megatron-LM and
    Megatron-Bridge read (``args``, ``checkpoint_version``, ``iteration`` in common.pt; ``run``: a training run's
    settings; ``tokenizer_dir``: the final place of the checkpoint's hf_assets/)."""
    get_format(fmt)
    if fmt == "torch_dist":
        write_megatron_lm_common(iter_dir, spec, tp=tp, pp=pp, dtype=dtype, transformer_impl=transformer_impl,
                                 iteration=iteration, run=run,
                                 tokenizer_dir=None if tokenizer_dir is None else str(tokenizer_dir))
    write_meta(iter_dir, {
        "format": fmt,
        "iteration": iteration,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        **({"expert_model_parallel_size": ep} if spec.arch.is_moe else {}),
        "transformer_impl": transformer_impl,
        "dtype": str(dtype).removeprefix("torch."),
        **spec.meta_fields(),
    })
