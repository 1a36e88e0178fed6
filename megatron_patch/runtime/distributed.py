"""Process-group and model-parallel setup: NCCL on GPUs, gloo on the CPU path; torchrun's environment or one process."""

from __future__ import annotations

import datetime
import os
import random
import socket
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, WorkerError
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


_TIMED_OUT_KEY = "megatron_patch/collective_timed_out/"


def _silent_ranks(grace_s: float) -> list[int] | None:
    """The ranks that did not report a timed-out collective within ``grace_s`` seconds (each rank that hits the
    timeout reports it through the rendezvous store); None when the store itself does not answer (it lives in rank
    0, or in torchrun's agent)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(grace_s, 1.0)))
        store.set(f"{_TIMED_OUT_KEY}{dist.get_rank()}", "1")
        world = dist.get_world_size()
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in range(world) if not store.check([f"{_TIMED_OUT_KEY}{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001  the store is unreachable: say so instead of naming a rank
        return None


@contextmanager
def collective_timeouts_reported(timeout_minutes: float, grace_s: float | None = None):
    """Turn a collective that timed out (a rank frozen, stopped or hung: gloo raises after ``timeout_minutes``) into
    one line naming the ranks that went silent, instead of a backend traceback. With NCCL the watchdog aborts the
    process at the timeout instead; the launcher reports that rank's end.

    Args:
        timeout_minutes: the process-group timeout (``--distributed-timeout-minutes``), for the message.
        grace_s: how long to wait for the other ranks to report their own timeout (default: a tenth of the timeout,
            5 .. 60 s): a rank that does not report is the silent one.
    """
    try:
        yield
    except RuntimeError as error:  # DistBackendError and gloo's timeouts are RuntimeErrors
        if isinstance(error, WorkerError) or not dist.is_initialized() or "timed out" not in str(error).lower():
            raise
        grace = grace_s if grace_s is not None else min(60.0, max(5.0, timeout_minutes * 6.0))
        silent = _silent_ranks(grace)
        who = ("the rendezvous store did not answer either (rank 0 or the launcher is gone)" if silent is None
               else f"rank(s) {', '.join(map(str, silent))} stopped responding" if silent
               else "every rank timed out (a collective mismatch, or one very slow step)")
        raise WorkerError(f"rank {dist.get_rank()}: a collective did not complete within "
                          f"--distributed-timeout-minutes {timeout_minutes:g}: {who}; ending the run") from None
