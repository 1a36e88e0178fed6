"""The family registry: a family is data (config mapping, flavors, weight table), registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError, UnsupportedModelError
from ..registry import Registry
from .arch import ModelArch


@dataclass(frozen=True)
class ModelFamily:
    """What one HF model family needs to become a megatron-core GPTModel and back.

    Attributes:
        name: registry name (``llama``), also the ``MODEL_NAME`` shell scripts accept.
        architectures: HF ``architectures`` entries this family reads.
        model_types: HF ``model_type`` values this family reads.
        arch_from_hf: HF ``config.json`` dict -> ModelArch (validates what it cannot represent).
        weight_mapping: ModelArch -> list of ``mapping.Row`` (one per megatron parameter name).
        flavors: named size presets as HF config dicts; ``tiny`` is the CPU/test preset.
        ignored_hf_keys: regexes of HF tensors that hold no weights (e.g. cached rotary frequencies).
        optional_hf_prefix: a prefix of the mapping's HF names that checkpoints saved from the base model lack
            (bloom's hub repositories store ``h.0...`` for ``transformer.h.0...``); both spellings are read.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    arch_from_hf: Callable[[dict], ModelArch]
    weight_mapping: Callable[[ModelArch], list]
    flavors: dict[str, dict] = field(default_factory=dict)
    ignored_hf_keys: tuple[str, ...] = ()
    optional_hf_prefix: str = ""

    def flavor(self, size: str) -> dict:
        key = size.lower()
        for name, cfg in self.flavors.items():
            if name.lower() == key:
                return dict(cfg)
        raise ConfigError(f"{self.name} has no size preset '{size}' (available: {', '.join(self.flavors)})")


def _load_builtin_families() -> None:
    from . import baichuan, bloom, llama, mixtral, qwen, qwen_moe  # noqa: F401  (each registers itself)


_FAMILIES: Registry[ModelFamily] = Registry("model family", ConfigError, "supported", load=_load_builtin_families)


def register_family(family: ModelFamily) -> ModelFamily:
    return _FAMILIES.add(family.name, family)


def supported_families() -> list[str]:
    return _FAMILIES.names()


def get_family(name: str) -> ModelFamily:
    return _FAMILIES.get(name)


def detect_family(hf_config: dict) -> ModelFamily:
    """Pick the family from ``architectures`` (first) or ``model_type``; the error names what is supported."""
    families = list(_FAMILIES.values())
    architectures = hf_config.get("architectures") or []
    for family in families:
        if any(arch in family.architectures for arch in architectures):
            return family
    model_type = hf_config.get("model_type")
    for family in families:
        if model_type in family.model_types:
            return family
    known = sorted(a for f in families for a in f.architectures)
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or model_type!r} (supported: {', '.join(known)})"
    )


def check_named_family(family: ModelFamily, hf_config: dict, flag: str = "--model-name") -> None:
    """Raise ``ConfigError`` when ``hf_config`` names another registered family than the one the user named.

    A family named by hand (``--model-name qwen``, a launch script's MODEL_NAME=qwen-7b) on a llama checkpoint
    otherwise fails later on a weight the wrong family expects (a missing ``q_proj.bias``); config.json says which
    family it is. A config no family recognises is left to the named family (the user chose it on purpose).
    """
    try:
        detected = detect_family(hf_config)
    except UnsupportedModelError:
        return
    if detected.name == family.name:
        return
    architectures = hf_config.get("architectures") or []
    says = ", ".join(architectures) if architectures else f"model_type {hf_config.get('model_type')}"
    raise ConfigError(f"{flag} {family.name} does not match the checkpoint: config.json says {says} (family "
                      f"{detected.name}); pass {flag} {detected.name} or omit it to detect the family")
