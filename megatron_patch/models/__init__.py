"""The model zoo: one file per family (HF config -> ModelArch, flavors, weight table) over one shared builder."""

from .arch import ModelArch, parse_rope
from .registry import ModelFamily, detect_family, get_family, register_family, supported_families

__all__ = ["ModelArch", "ModelFamily", "detect_family", "get_family", "parse_rope", "register_family",
           "supported_families"]
