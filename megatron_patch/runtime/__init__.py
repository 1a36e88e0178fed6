"""Process setup: distributed init (NCCL or gloo), the device helper, the CPU path for megatron-core (and its
strict device check), seeds, version checks."""

from .cpu import cuda_available, disable_cpu_path, enable_cpu_path
from .device import HOST, device_generator, local_device, place_model, set_local_device, to_device
from .distributed import destroy_distributed, free_port, init_distributed, set_seed
from .launch import run_on_local_ranks
from .versions import check_megatron_version

__all__ = [
    "HOST",
    "check_megatron_version",
    "cuda_available",
    "destroy_distributed",
    "disable_cpu_path",
    "device_generator",
    "enable_cpu_path",
    "free_port",
    "init_distributed",
    "local_device",
    "place_model",
    "run_on_local_ranks",
    "set_local_device",
    "set_seed",
    "to_device",
]
