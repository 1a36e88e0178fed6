"""Worker functions for the family parity tests: module level so spawned local ranks can import them.

One call of ``parity_job`` runs every family variant at one TP x PP inside one set of ranks (rank start-up costs
seconds; the models cost milliseconds).
"""

from __future__ import annotations

import torch


def _logits(iter_dir, tokens, tp, pp):
    """Build the model at TP x PP, load the checkpoint (strictly, either format), return padded-vocab logits."""
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.models.inference import forward_logits

    ckpt = Checkpoint.open(iter_dir)
    model = build_model(ckpt.spec.arch, ckpt.spec.padded_vocab_size, parallel_output=False)
    ckpt.load_into(model)
    model.eval()
    return forward_logits(model, tokens)


def parity_job(variants: list[dict], tokens: torch.Tensor, tp: int, pp: int):
    """For each variant: run its torch_dist and its legacy checkpoint (both converted for this TP x PP) at TP x PP.

    Returns, on the rank holding the full logits, {name: {"torch_dist": logits, "legacy": logits}} (padded vocab);
    None on the others.
    """
    from megatron.core import parallel_state

    from megatron_patch.checkpoint.megatron import find_iteration_dir
    from megatron_patch.runtime import init_distributed

    init_distributed(tp, pp)
    results = {}
    for variant in variants:
        results[variant["name"]] = {
            "torch_dist": _logits(find_iteration_dir(variant["torch_dist_dir"]), tokens, tp, pp),
            "legacy": _logits(find_iteration_dir(variant["legacy_dir"]), tokens, tp, pp),
        }
    holder = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return results if holder else None
