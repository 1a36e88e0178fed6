"""Process setup: distributed init (NCCL or gloo), the device helper, the CPU path for megatron-core (and its
strict device check), seeds, version checks.

The names below are imported from their modules on first use (PEP 562): a light tool that needs only
``runtime.progress`` (preprocessing and its spawned workers) does not pay for torch and megatron-core at start-up.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "cuda_available": "cpu",
    "disable_cpu_path": "cpu",
    "enable_cpu_path": "cpu",
    "HOST": "device",
    "device_generator": "device",
    "local_device": "device",
    "place_model": "device",
    "set_local_device": "device",
    "to_device": "device",
    "destroy_distributed": "distributed",
    "free_port": "distributed",
    "init_distributed": "distributed",
    "set_seed": "distributed",
    "run_on_local_ranks": "launch",
    "check_megatron_version": "versions",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
