"""The converter's plan: a ``ModelSpec`` placed on TP x PP ranks, plus what only the converter does with HF
directories (reading tensors stored without the family's optional prefix; validating a HF checkpoint before work).
The sharding itself is ``mapping.Sharding``'s."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..checkpoint.hf import HFCheckpointReader
from ..errors import CheckpointError
from ..mapping import Sharding, megatron_shape
from ..models.spec import ModelSpec


class PrefixTolerantReader:
    """A view of an HF checkpoint in which tensors saved without ``prefix`` answer to their prefixed names.

    Some hub repositories were saved from the base model rather than the ``*ForCausalLM`` wrapper (bloom's hold
    ``h.0...`` for ``transformer.h.0...``); transformers loads both spellings, and so does the converter. Exports
    always use the prefixed names.
    """

    def __init__(self, reader: HFCheckpointReader, prefix: str):
        self.reader, self.prefix = reader, prefix

    def _stored(self, name: str) -> str:
        if name not in self.reader and name.startswith(self.prefix) and name[len(self.prefix):] in self.reader:
            return name[len(self.prefix):]
        return name

    def names(self) -> list[str]:
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        return self._stored(name) in self.reader

    def shape(self, name: str):
        return self.reader.shape(self._stored(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self._stored(name))

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._stored(name))


@dataclass(frozen=True)
class ConversionPlan:
    """``spec`` on ``tp`` x ``pp`` (x ``ep`` for a MoE model) ranks; ``sharding`` (built and validated on
    construction) places its weights."""

    spec: ModelSpec
    tp: int
    pp: int
    sharding: Sharding = field(init=False)
    ep: int = 1

    def __post_init__(self):
        object.__setattr__(self, "sharding", self.spec.sharding(self.tp, self.pp, self.ep))

    @property
    def family(self):
        return self.spec.family

    @property
    def arch(self):
        return self.spec.arch

    def open_hf(self, hf_dir) -> HFCheckpointReader | PrefixTolerantReader:
        """A reader of ``hf_dir`` that also finds tensors stored without the family's optional name prefix."""
        reader = HFCheckpointReader(hf_dir)
        prefix = self.family.optional_hf_prefix
        return PrefixTolerantReader(reader, prefix) if prefix else reader

    def validate_hf(self, reader: HFCheckpointReader) -> None:
        """Check before any work: every tensor the mapping needs exists with the shape the config implies, and
        no tensor is left unconverted. Runs the transforms on meta tensors, so nothing is read."""
        ignored = [re.compile(p) for p in self.family.ignored_hf_keys]
        prefix = self.family.optional_hf_prefix
        used: set[str] = set()
        for stage in range(self.pp):
            for entry in self.sharding.stage_entries(stage):  # every expert (global ids)
                names = entry.hf_names
                for name in names:
                    if name not in reader:
                        raise CheckpointError(f"the HF checkpoint has no tensor '{name}' (does config.json match the weights?)")
                    if not reader.dtype(name).is_floating_point:
                        raise CheckpointError(f"the HF tensor '{name}' has dtype {reader.dtype(name)}; a weight "
                                              "must be floating point")
                used.update(names)
                metas = [torch.empty(reader.shape(n), device="meta") for n in names]
                expected = megatron_shape(entry.global_name, self.arch, self.arch.vocab_size)
                try:
                    got = tuple(entry.row.hf_to_megatron(metas, self.arch).shape)
                except RuntimeError:
                    got = None
                if got != expected:
                    shapes = ", ".join(f"{n} {tuple(reader.shape(n))}" for n in names)
                    raise CheckpointError(f"config.json does not match the weights: {shapes} cannot form "
                                          f"{entry.global_name} of shape {expected}")
        unused = [n for n in reader.names()
                  if n not in used and prefix + n not in used and not any(p.fullmatch(n) for p in ignored)]
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise CheckpointError(f"the HF checkpoint has tensors config.json does not account for: "
                                  f"{', '.join(sorted(unused)[:3])}{more}")
