"""``ModelSpec``: what a model is (family, architecture, HF config, vocabulary sizes), independent of how it is
parallelised. Training, generation and RLHF hold one; the converter adds TP x PP to it (``convert.ConversionPlan``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from ..mapping import Sharding, layouts
from .arch import ModelArch
from .registry import ModelFamily, check_named_family, detect_family, get_family


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity.

    Attributes:
        family: the registered family (config mapping, weight rows).
        arch: the architecture ``family.arch_from_hf(hf_config)`` gives.
        hf_config: the HF ``config.json`` it came from (written back on export).
        extra_vocab_size: token rows added at conversion beyond the HF vocabulary (``--extra-vocab-size``).
        padded_vocab_size: rows the megatron embedding holds (real tokens plus padding no id reaches).
        make_vocab_size_divisible_by: the padding multiple (per TP rank) the vocabulary was padded with.
    """

    family: ModelFamily
    arch: ModelArch
    hf_config: dict
    extra_vocab_size: int
    padded_vocab_size: int
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        if self.extra_vocab_size < 0:
            raise ConfigError(f"extra vocabulary size must be >= 0 (got {self.extra_vocab_size})")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"{self.padded_vocab_size} vocabulary rows cannot hold {self.vocab_size} tokens")

    @property
    def vocab_size(self) -> int:
        """Real tokens: the HF vocabulary plus the extra ones."""
        return self.arch.vocab_size + self.extra_vocab_size

    @classmethod
    def from_hf_config(cls, hf_config: dict, *, tp: int, family: str | ModelFamily | None = None,
                       make_vocab_size_divisible_by: int = 128, extra_vocab_size: int = 0) -> ModelSpec:
        """A new model from a HF config: the vocabulary padded to a multiple of divisible_by x ``tp``
        (Megatron-LM's rule, so every TP rank gets equal rows). The family is detected when not given."""
        if family is None:
            family = detect_family(hf_config)
        else:
            family = get_family(family) if isinstance(family, str) else family
            check_named_family(family, hf_config)
        arch = family.arch_from_hf(hf_config)
        if extra_vocab_size < 0:
            raise ConfigError(f"extra vocabulary size must be >= 0 (got {extra_vocab_size})")
        if make_vocab_size_divisible_by < 1:
            raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1 (got {make_vocab_size_divisible_by})")
        padded = layouts.padded_vocab_size(arch.vocab_size + extra_vocab_size, make_vocab_size_divisible_by, tp)
        return cls(family, arch, dict(hf_config), extra_vocab_size, padded, make_vocab_size_divisible_by)

    @classmethod
    def from_flavor(cls, family: str, size: str, *, tp: int, make_vocab_size_divisible_by: int = 128,
                    extra_vocab_size: int = 0) -> ModelSpec:
        """A family's size preset (``--model-name`` / ``--model-size``) as a new model."""
        fam = get_family(family)
        return cls.from_hf_config(fam.flavor(size), tp=tp, family=fam,
                                  make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                  extra_vocab_size=extra_vocab_size)

    @classmethod
    def from_meta(cls, meta: dict) -> ModelSpec:
        """The model a checkpoint holds (``megatron_patch.json``), with its vocabulary rows as saved."""
        family = get_family(meta["family"])
        return cls(family, family.arch_from_hf(meta["hf_config"]), dict(meta["hf_config"]), meta["extra_vocab_size"],
                   meta["padded_vocab_size"], meta["make_vocab_size_divisible_by"])

    def meta_fields(self) -> dict:
        """What ``megatron_patch.json`` records of the model (``from_meta`` reads it back)."""
        return {
            "family": self.family.name,
            "vocab_size": self.vocab_size,
            "extra_vocab_size": self.extra_vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "hf_config": self.hf_config,
        }

    def with_arch(self, **changes) -> ModelSpec:
        """The same model with some architecture fields replaced (e.g. the reward model's tied backbone)."""
        return dataclasses.replace(self, arch=dataclasses.replace(self.arch, **changes))

    def sharding(self, tp: int, pp: int, ep: int = 1) -> Sharding:
        """This model's weight rows placed on TP x PP (x EP) ranks (raises a one-line error if it cannot be split
        so)."""
        return Sharding(rows=tuple(self.family.weight_mapping(self.arch)), arch=self.arch, tp=tp, pp=pp,
                        padded_vocab_size=self.padded_vocab_size, extra_vocab_size=self.extra_vocab_size, ep=ep)
