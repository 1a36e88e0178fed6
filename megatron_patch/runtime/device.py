"""Where this process's tensors live: the one place that decides it.

On a GPU machine that is ``cuda:LOCAL_RANK`` (selected with ``torch.cuda.set_device`` by ``init_distributed``); on
the CPU path it is the CPU, or, under the strict device check (``runtime.strict``), a symbolic ``cuda:0`` that the
CPU path maps to the CPU while remembering which tensors were placed there. Training, generation and verification
code never guesses a device: it asks ``local_device()`` or follows a tensor that already lives there.

The model is placed as Megatron-LM's ``get_model`` does: built (on the host, ``use_cpu_initialization=True``), then
moved once with ``place_model`` before it is wrapped in megatron-core DDP and handed to the optimizer.
"""

from __future__ import annotations

import os

import torch

from . import strict
from .cpu import cuda_available

# Where batches are assembled row by row from Python lists before one move with ``to_device`` (filling a tensor
# on the GPU element by element would launch a kernel per row), and where models are built before ``place_model``.
HOST = torch.device("cpu")


def set_local_device() -> None:
    """Select ``cuda:LOCAL_RANK`` for this process (torchrun's LOCAL_RANK; 0 without it). No-op without CUDA."""
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def local_device() -> torch.device:
    """The device this process computes on: ``cuda:<current>`` with CUDA, else the CPU (``cuda:0`` when strict)."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    if strict.is_active():
        return strict.SYMBOLIC_DEVICE
    return torch.device("cpu")


def place_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move a freshly built model (parameters and buffers) to ``local_device()``, in place; returns it.

    Call it after building and before wrapping in DDP or building the optimizer: both allocate their buffers
    next to the parameters they find.
    """
    device = local_device()
    if device.type == "cuda":
        model.cuda(device)
    strict.mark_module(model)
    return model


def to_device(batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """A batch dict with every tensor moved to ``local_device()`` (once per step, at the top of the step)."""
    device = local_device()
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def device_generator(seed: int) -> torch.Generator:
    """A seeded random generator on ``local_device()`` (sampling ops refuse a generator on another device)."""
    if cuda_available():
        generator = torch.Generator(device=local_device())
    else:
        generator = torch.Generator()
        strict.mark_generator(generator)
    return generator.manual_seed(seed)
