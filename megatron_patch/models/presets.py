"""The one check that a size preset (``--model-size``) describes a checkpoint, for training and generation alike."""

from __future__ import annotations

from ..errors import ConfigError
from .registry import ModelFamily


def preset_shape(family: ModelFamily, size: str) -> tuple[int, int, int]:
    """(layers, hidden size, routed experts) of a family's size preset (0 experts for a dense model); an unknown
    preset raises, listing the family's presets."""
    return _shape(family.arch_from_hf(family.flavor(size)))


def _shape(arch) -> tuple[int, int, int]:
    return arch.num_layers, arch.hidden_size, arch.num_experts


def _describe(shape: tuple[int, int, int]) -> str:
    layers, hidden, experts = shape
    return f"{layers} layers, hidden {hidden}" + (f", {experts} experts" if experts else "")


def check_size_preset(family: ModelFamily, size: str, hf_config: dict, flag: str = "--model-size",
                      source: str = "the --load checkpoint") -> None:
    """Raise ``ConfigError`` unless preset ``size`` of ``family`` has the layers, hidden size and expert count of
    ``hf_config``.

    The launch scripts always pass a size (MODEL_SIZE) next to a checkpoint; a preset that does not describe it is
    almost always a typo or the wrong checkpoint, so the message names the preset(s) the checkpoint does match.
    """
    wanted = preset_shape(family, size)
    saved = _shape(family.arch_from_hf(hf_config))
    if wanted == saved:
        return
    matching = [name for name in family.flavors if preset_shape(family, name) == saved]
    hint = (f"the checkpoint is {family.name} preset {' / '.join(matching)}" if matching
            else f"no {family.name} preset has that shape ({', '.join(family.flavors)})")
    raise ConfigError(f"{flag} {size} ({_describe(wanted)}) does not match {source} ({_describe(saved)}): {hint}")
