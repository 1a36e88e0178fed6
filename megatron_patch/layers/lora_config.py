"""LoRA settings and the adapter checkpoint's record, without megatron-core (the converters read them).

See ``layers/lora.py`` for the adapters themselves.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
LORA_KEY = ".lora."  # in every adapter parameter's (and checkpoint key's) name


@dataclass(frozen=True)
class LoRAConfig:
    """``--lora-rank`` r, ``--lora-alpha`` (scale alpha / r), ``--lora-dropout`` (on the adapter's input) and
    ``--lora-target-modules`` (a subset of TARGET_MODULES)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 (got {self.rank})")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be a positive number (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ConfigError(f"--lora-target-modules: unknown {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(TARGET_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"--lora-target-modules lists a module twice: {' '.join(self.target_modules)}")
        return self

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse a rank larger than a targeted layer: ``shapes`` maps each target to its full (out, in)."""
        for name in self.target_modules:
            out_features, in_features = shapes[name]
            if self.rank > min(out_features, in_features):
                raise ConfigError(f"--lora-rank {self.rank} is larger than {name} ({out_features} x {in_features}): "
                                  f"use at most {min(out_features, in_features)}")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        return cls(int(data["rank"]), float(data["alpha"]), float(data.get("dropout", 0.0)),
                   tuple(data["target_modules"])).validate()


def layer_shapes(arch) -> dict[str, tuple[int, int]]:
    """Full (out, in) of each target linear of a decoder layer of ``arch`` (a ModelArch)."""
    q = arch.num_attention_heads * arch.head_dim
    kv = 2 * arch.num_query_groups * arch.head_dim
    fc1 = arch.ffn_hidden_size * (2 if arch.gated_linear_unit else 1)
    return {"linear_qkv": (q + kv, arch.hidden_size), "linear_proj": (arch.hidden_size, q),
            "linear_fc1": (fc1, arch.hidden_size), "linear_fc2": (arch.hidden_size, arch.ffn_hidden_size)}


def full_adapter_init(name: str, rank: int, in_features: int, out_features: int, seed: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the full layer: A as PEFT initialises it (kaiming-uniform, a = sqrt(5)), B zero; A depends only
    on (seed, ``name``), the parameter's global name."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight
    weight_a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return weight_a.to(dtype), torch.zeros(out_features, rank, dtype=dtype)


# --- the adapter checkpoint's pointer to its base ------------------------------------------------------------------

LORA_META = "lora.json"  # in an adapter checkpoint's iteration directory: the LoRA settings and the frozen base


def write_lora_meta(iter_dir, lora: LoRAConfig, base_dir) -> None:
    """Record in ``iter_dir`` that it holds only adapters, trained with ``lora`` on the base at ``base_dir``."""
    path = Path(iter_dir) / LORA_META
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"lora": lora.to_dict(), "base": str(Path(base_dir).resolve())}, indent=2) + "\n")
    tmp.replace(path)


def read_lora_meta(iter_dir) -> dict | None:
    """{"lora": LoRAConfig, "base": Path} of an adapter checkpoint, or None for a checkpoint of full weights."""
    path = Path(iter_dir) / LORA_META
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {"lora": LoRAConfig.from_dict(data["lora"]), "base": Path(data["base"])}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a LoRA record: {error}") from None
