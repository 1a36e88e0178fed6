"""Checkpoint conversion HF <-> megatron-core: layout primitives, mapping rows, one sharding engine, readers/writers.

The public functions are imported lazily: ``python -m megatron_patch.convert`` re-imports this package in every
helper process that multiprocessing spawns (dist_checkpointing starts one per rank), and those need no torch.
"""

_EXPORTS = {"hf_to_mcore": ".hf_to_mcore", "mcore_to_hf": ".mcore_to_hf", "verify": ".verify"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
