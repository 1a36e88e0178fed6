"""The MoE losses of a training step, as Megatron-LM logs them: megatron-core's routers add each layer's
load-balancing (and z-) loss to a tracker during the forward passes; after the step it is reduced over the pipeline
stages (and TP / DP as the router asks), averaged over the micro-batches and the MoE layers, and cleared."""

from __future__ import annotations

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
