"""Process setup: distributed init (NCCL or gloo), the CPU path for megatron-core, seeds, version checks."""

from .cpu import cuda_available, enable_cpu_path
from .distributed import destroy_distributed, free_port, init_distributed, set_seed
from .launch import WorkerError, run_on_local_ranks
from .versions import UnsupportedVersionError, check_megatron_version

__all__ = [
    "UnsupportedVersionError",
    "WorkerError",
    "check_megatron_version",
    "cuda_available",
    "destroy_distributed",
    "enable_cpu_path",
    "free_port",
    "init_distributed",
    "run_on_local_ranks",
    "set_seed",
]
