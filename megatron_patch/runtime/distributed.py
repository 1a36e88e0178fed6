"""Process-group and model-parallel setup: NCCL on GPUs, gloo on the CPU path; torchrun's environment or one process."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError
from .cpu import disable_cpu_path, enable_cpu_path
from .device import set_local_device
from .moe_fixes import fix_moe_router_without_te
from .versions import check_megatron_version


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    expert_model_parallel_size: int = 1,
) -> None:
    """Initialise torch.distributed (if needed), megatron-core's parallel state and the RNG streams.

    Expert parallelism is carved out of data parallelism (megatron-core's rule, each expert's weights split over
    the TP ranks): ``expert_model_parallel_size`` x TP must divide the ranks of one pipeline stage.
    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them; without them runs as a single
    process. Uses NCCL when CUDA is available, else gloo plus the CPU path (``runtime.cpu``).
    """
    check_megatron_version()
    from megatron.core import parallel_state

    fix_moe_router_without_te()
    on_cpu = enable_cpu_path()
    set_local_device()  # before NCCL starts: it binds each rank to the current device
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if os.environ["WORLD_SIZE"] != "1":
                raise ConfigError("MASTER_PORT is not set for a multi-process run; launch with torchrun")
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ConfigError(
            f"world size {world} is not divisible by tensor x pipeline parallel size "
            f"{tensor_model_parallel_size}x{pipeline_model_parallel_size}"
        )
    stage_ranks = world // pipeline_model_parallel_size
    if stage_ranks % (expert_model_parallel_size * tensor_model_parallel_size):
        raise ConfigError(
            f"--expert-model-parallel-size {expert_model_parallel_size} x tensor parallel size "
            f"{tensor_model_parallel_size} does not divide the {stage_ranks} ranks of a pipeline stage "
            f"(world size {world} / PP {pipeline_model_parallel_size})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch; offset by pipeline rank as Megatron-LM does, then the TP RNG streams.

    The streams are seeded by megatron-core's ``model_parallel_cuda_manual_seed`` (its offsets per TP / expert rank);
    on the CPU path it seeds the CPU tracker ``enable_cpu_path`` installed in place of the CUDA one.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down what ``init_distributed`` set up: parallel state, the process group, the CPU path."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    disable_cpu_path()
