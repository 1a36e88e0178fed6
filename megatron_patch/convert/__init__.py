"""Checkpoint conversion HF <-> megatron-core: layout primitives, mapping rows, one sharding engine, readers/writers."""

from .hf_to_mcore import hf_to_mcore
from .mcore_to_hf import mcore_to_hf
from .verify import verify

__all__ = ["hf_to_mcore", "mcore_to_hf", "verify"]
