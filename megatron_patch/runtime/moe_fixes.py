"""A fix to megatron-core 0.16.1's MoE router on machines without Transformer Engine (CPUs, and GPUs without TE).

``transformer/moe/moe_utils.py`` binds ``te_general_gemm`` only when Transformer Engine imports, but its router
gating (``RouterGatingLinearFunction``) tests ``te_general_gemm is not None`` unconditionally: without TE every MoE
forward raised ``NameError``. Binding the name to None selects the plain ``torch.mm`` path that code already has.
"""

from __future__ import annotations

from .versions import check_megatron_version


def fix_moe_router_without_te() -> None:
    """Idempotent; does nothing where Transformer Engine provides the name."""
    check_megatron_version()  # written against megatron-core 0.16's moe_utils
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def host_split_sizes_for_alltoall() -> None:
    """On the CPU path: the alltoall token dispatcher's split sizes as numpy arrays, as on a GPU.

    ``token_dispatcher`` moves its split-size tensors to the host with ``moe_utils.maybe_move_tensor_to_cpu(...,
    as_numpy=True)``, which converts only CUDA tensors; on the CPU they stayed tensors and gloo's
    ``all_to_all_single`` refused them as split sizes. Only the dispatcher's binding of the function is replaced.
    """
    check_megatron_version()
    import torch
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(token_dispatcher.maybe_move_tensor_to_cpu, "host_split_sizes", False):
        return

    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.detach().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    move.host_split_sizes = True
    token_dispatcher.maybe_move_tensor_to_cpu = move
