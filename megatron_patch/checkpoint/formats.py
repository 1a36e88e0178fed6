"""The registry of Megatron checkpoint formats (``torch_dist``, ``legacy``): how each one writes a model from HF
tensors, reads it back one full tensor at a time, and loads it into a live model stage at any TP x PP.

A format registers itself with ``@register_format("name")``; ``get_format(name)`` is the only lookup, so adding a
format is one file and no ``if meta["format"] == ...`` anywhere.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError
from ..mapping import Sharding
from ..mapping.sharding import TensorSource
from ..registry import Registry


class MegatronTensors(Protocol):
    """Full (TP-merged) megatron tensors of a stored checkpoint, addressed by global parameter name
    (``decoder.layers.5.mlp.linear_fc1.weight``)."""

    def full(self, global_name: str) -> torch.Tensor: ...

    def meta(self, global_name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype ``full`` returns (no tensor data is read)."""

    def shards(self, global_name: str) -> list[torch.Tensor]:
        """The tensors ``full`` merges, as stored: the TP shards (views of memory-mapped files where the format
        allows), or ``[full]`` for a format that stores the full tensor."""


class CheckpointFormat(ABC):
    """One way of storing a megatron-core model in an iteration directory."""

    name: str

    @abstractmethod
    def write(self, sharding: Sharding, source: TensorSource, iter_dir: Path, *, dtype: torch.dtype,
              transformer_impl: str, progress=None, megatron_lm: dict | None = None) -> None:
        """Write the model ``sharding`` places, built from the HF tensors of ``source``, into ``iter_dir``.

        ``megatron_lm``: what Megatron-LM records beside the tensors (``megatron_lm_args.megatron_lm_common``), for
        a format that stores it with them (legacy rank files; torch_dist's common.pt is written with the metadata).
        """

    @abstractmethod
    def write_steps(self, sharding: Sharding) -> int:
        """How many ``progress.update(1)`` calls ``write`` makes (a progress bar's total)."""

    @abstractmethod
    def open_reader(self, iter_dir: Path, saved: Sharding, transformer_impl: str) -> MegatronTensors:
        """Read a checkpoint saved as ``saved`` describes (its TP x PP and rows), validating its files first."""

    @abstractmethod
    def export_dtype(self, saved_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype exported tensors get, or None to keep each stored tensor's own dtype."""

    @abstractmethod
    def load_into_model(self, model: torch.nn.Module, iter_dir: Path, saved: Sharding, target: Sharding,
                        tp_rank: int, pp_rank: int, transformer_impl: str, ep_rank: int = 0) -> None:
        """Fill this rank's model stage (built for ``target``'s TP x PP x EP; a MoE model's routed experts are those
        of expert-parallel rank ``ep_rank``); every parameter must be found."""


def _load_builtin_formats() -> None:
    from . import legacy, torch_dist  # noqa: F401  (each registers itself)


_FORMATS: Registry[type[CheckpointFormat]] = Registry("checkpoint format", CheckpointError, "known",
                                                      load=_load_builtin_formats)


def register_format(name: str):
    """Class decorator: register a ``CheckpointFormat`` subclass (stateless) under ``name``."""

    def register(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
        _FORMATS.add(name, cls)
        cls.name = name
        return cls

    return register


def format_names() -> list[str]:
    return _FORMATS.names()


def get_format(name: str, where: str | os.PathLike | None = None) -> CheckpointFormat:
    """The format registered as ``name``; the error names ``where`` (the file that asked for it) and the valid
    names."""
    return _instance(_FORMATS.get(name, prefix=f"{where}: " if where is not None else ""))


@functools.cache
def _instance(cls: type[CheckpointFormat]) -> CheckpointFormat:
    return cls()  # one object per format: formats hold no state
