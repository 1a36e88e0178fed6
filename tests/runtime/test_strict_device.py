"""The strict device check of the CPU path (runtime/strict.py): planted misplacements are caught, naming the op;
what CUDA allows (0-dim host operands, copies and moves across, following a tensor's device) is not."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.runtime import run_on_local_ranks

STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1", "CUDA_VISIBLE_DEVICES": ""}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is inactive on a CUDA machine")


def _outcome(make) -> str:
    """'ok' or the DeviceMismatchError message of calling ``make``."""
    from megatron_patch.runtime.strict import DeviceMismatchError

    try:
        make()
    except DeviceMismatchError as error:
        return str(error)
    return "ok"


def _planted_mistakes() -> dict[str, str]:
    import torch.distributed as dist

    from megatron_patch.runtime import device_generator, init_distributed, local_device, place_model

    init_distributed(1, 1)
    dev = torch.arange(6.0, device=local_device()).reshape(2, 3)
    embedding = place_model(torch.nn.Embedding(10, 4))
    probs = torch.full((2, 5), 0.2, device=local_device())
    cases = {
        # misplacements (each fails on a GPU)
        "host operand": lambda: dev + torch.ones(2, 3),
        "host token ids": lambda: embedding(torch.tensor([[1, 2, 3]])),
        "unplaced model": lambda: torch.nn.Embedding(10, 4)(torch.tensor([[1, 2]], device=local_device())),
        "host accumulator": lambda: torch.zeros(2, dtype=torch.float64).add_(dev[0, :2].double()),
        "host generator": lambda: torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)),
        "host collective": lambda: dist.all_reduce(torch.zeros(2)),
        "cat across": lambda: torch.cat([dev, torch.zeros(1, 3)]),
        "host values written": lambda: dev.__setitem__(torch.tensor([0]), torch.ones(1, 3)),
        # legal on a GPU
        "0-dim host operand": lambda: dev * torch.tensor(2.0),
        "moved operand": lambda: dev + torch.ones(2, 3).to(local_device()),
        "cuda() operand": lambda: dev + torch.ones(2, 3).cuda(),
        "following x.device": lambda: dev + torch.arange(3.0, device=dev.device),
        "copy across": lambda: torch.zeros(2, 3).copy_(dev) + torch.ones(2, 3),
        "back on the host": lambda: dev.cpu() + torch.ones(2, 3),
        "device generator": lambda: torch.multinomial(probs, 1, generator=device_generator(0)),
        "device collective": lambda: dist.all_reduce(torch.zeros(2, device=local_device())),
        "placed model": lambda: embedding(torch.tensor([[1, 2]]).to(local_device())),
        "host index": lambda: dev[torch.tensor([1, 0])] + 1,
    }
    outcomes = {name: _outcome(make) for name, make in cases.items()}
    # Results of ops on device tensors stay on the device, and say so as on a GPU.
    derived = (dev.sum(0) * 3).view(-1)[1:]
    outcomes["derived device"] = str(derived.device)
    outcomes["host device"] = str(torch.ones(2).device)
    return outcomes


@pytest.fixture(scope="module")
def outcomes():
    return run_on_local_ranks(_planted_mistakes, 1, env=STRICT, timeout=300)[0]


@pytest.mark.parametrize("case,op", [
    ("host operand", "Tensor.add"),
    ("host token ids", "embedding"),
    ("unplaced model", "embedding"),
    ("host accumulator", "Tensor.add_"),
    ("host generator", "torch.multinomial"),
    ("host collective", "torch.distributed.all_reduce"),
    ("cat across", "torch.cat"),
    ("host values written", "Tensor.__setitem__"),
])
def test_planted_misplacement_is_caught_naming_the_op(outcomes, case, op):
    message = outcomes[case]
    assert message != "ok", f"{case}: not caught"
    assert op in message, message


@pytest.mark.parametrize("case", ["0-dim host operand", "moved operand", "cuda() operand", "following x.device",
                                  "copy across", "back on the host", "device generator", "device collective",
                                  "placed model", "host index"])
def test_what_cuda_allows_passes(outcomes, case):
    assert outcomes[case] == "ok"


def test_device_tensors_report_the_device(outcomes):
    assert outcomes["derived device"] == "cuda:0"
    assert outcomes["host device"] == "cpu"


def _plain_path_accepts() -> str:
    from megatron_patch.runtime import init_distributed, local_device

    init_distributed(1, 1)
    dev = torch.arange(6.0, device=local_device()).reshape(2, 3)
    return str((dev + torch.ones(2, 3)).device)


def test_plain_cpu_path_cannot_see_the_mistake():
    """Why the strict check exists: without it the same misplaced operand passes on the CPU path."""
    env = {"MEGATRON_PATCH_STRICT_DEVICE": "0", "CUDA_VISIBLE_DEVICES": ""}
    assert run_on_local_ranks(_plain_path_accepts, 1, env=env, timeout=300) == ["cpu"]
