"""The one check that a size preset (``--model-size``) describes a checkpoint, for training and generation alike."""

from __future__ import annotations

from ..errors import ConfigError
from .registry import ModelFamily


def preset_shape(family: ModelFamily, size: str) -> tuple[int, int]:
    """(layers, hidden size) of a family's size preset; an unknown preset raises, listing the family's presets."""
    arch = family.arch_from_hf(family.flavor(size))
    return arch.num_layers, arch.hidden_size


def check_size_preset(family: ModelFamily, size: str, hf_config: dict, flag: str = "--model-size",
                      source: str = "the --load checkpoint") -> None:
    """Raise ``ConfigError`` unless preset ``size`` of ``family`` has the layers and hidden size of ``hf_config``.

    The launch scripts always pass a size (MODEL_SIZE) next to a checkpoint; a preset that does not describe it is
    almost always a typo or the wrong checkpoint, so the message names the preset(s) the checkpoint does match.
    """
    wanted = preset_shape(family, size)
    arch = family.arch_from_hf(hf_config)
    saved = (arch.num_layers, arch.hidden_size)
    if wanted == saved:
        return
    matching = [name for name in family.flavors if preset_shape(family, name) == saved]
    hint = (f"the checkpoint is {family.name} preset {' / '.join(matching)}" if matching
            else f"no {family.name} preset has that shape ({', '.join(family.flavors)})")
    raise ConfigError(f"{flag} {size} ({wanted[0]} layers, hidden {wanted[1]}) does not match {source} "
                      f"({saved[0]} layers, hidden {saved[1]}): {hint}")
