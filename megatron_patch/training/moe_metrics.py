"""The MoE losses of a training step, as Megatron-LM logs them: megatron-core's routers add each layer's
load-balancing (and z-) loss to a tracker during the forward passes; after the step it is reduced over the pipeline
stages (and TP / DP as the router asks), averaged over the micro-batches and the MoE layers, and cleared."""

from __future__ import annotations

import torch

from ..models.arch import ModelArch
from .arguments import TrainConfig

LOAD_BALANCING = "load_balancing_loss"
Z_LOSS = "z_loss"


def tracked_names(cfg: TrainConfig) -> list[str]:
    """The losses the routers record for these flags (megatron-core's names, which are also Megatron-LM's tags)."""
    names = []
    if cfg.moe_aux_loss_coeff > 0 and cfg.moe_router_load_balancing_type == "aux_loss":
        names.append(LOAD_BALANCING)
    elif cfg.moe_aux_loss_coeff > 0 and cfg.moe_router_load_balancing_type == "seq_aux_loss":
        names.append("seq_" + LOAD_BALANCING)
    if cfg.moe_z_loss_coeff:
        names.append(Z_LOSS)
    return names


def step_moe_losses(cfg: TrainConfig, arch: ModelArch, num_microbatches: int, iteration: int) -> dict[str, float]:
    """{name: mean over MoE layers and micro-batches} of this step's losses, on every rank; clears the tracker.
    Collective (every rank calls it after each step). Empty for a dense model or with the losses off."""
    names = tracked_names(cfg)
    if not arch.is_moe or not names:
        return {}
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    totals: dict = {}
    # force_initialize: a stage without MoE layers holds no entry but must join the pipeline-wide reduction.
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=iteration, total_loss_dict=totals,
                      force_initialize=True, track_names=names, num_layers=arch.num_layers,
                      moe_layer_freq=list(arch.moe_layers) if arch.moe_layers is not None else 1)
    return {name: float(value) for name, value in totals.items()}


class ExpertLoad:
    """Tokens each routed expert of each MoE layer received during one step, counted by forward hooks on
    megatron-core's routers (their ``routing_map``: tokens x experts, true where a token goes to an expert).

    ``spread()`` reports, per MoE layer, the busiest expert's tokens over the mean (1.0 = perfectly balanced); the
    log line carries the largest of them, TensorBoard every layer's (``moe/expert_load_max_over_mean_layer_<l>``).
    """

    TAG = "expert load max/mean"

    def __init__(self, model, arch: ModelArch, device):
        from megatron.core.transformer.moe.router import Router

        self.arch = arch
        self.counts = torch.zeros(arch.num_layers, max(arch.num_experts, 1), dtype=torch.int64, device=device)
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        for router in self.routers:
            router.register_forward_hook(self._record)

    def _record(self, router, inputs, outputs) -> None:
        routing_map = outputs[1]
        self.counts[router.layer_number - 1] += routing_map.reshape(-1, routing_map.shape[-1]).sum(0)

    def reset(self) -> None:
        self.counts.zero_()

    def spread(self) -> dict[int, float]:
        """{global layer: max/mean tokens per expert} over the whole step (all ranks). Collective."""
        from megatron.core import parallel_state

        counts = self.counts.clone()
        torch.distributed.all_reduce(counts)  # every rank's tokens; each TP rank routed the same tokens
        counts = counts.double() / parallel_state.get_tensor_model_parallel_world_size()
        return {layer: float(counts[layer].max() / counts[layer].mean().clamp(min=1e-9))
                for layer in range(self.arch.num_layers) if self.arch.is_moe_layer(layer)}
