"""Worker functions for the family parity tests: module level so spawned local ranks can import them.

One call of ``parity_job`` runs every family variant at one TP x PP inside one set of ranks (rank start-up costs
seconds; the models cost milliseconds).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _logits(iter_dir, tokens, tp, pp):
    """Build the model at TP x PP, load the checkpoint (strictly, either format), return padded-vocab logits."""
    from megatron_patch.convert.mcore_io import load_checkpoint_into_model, plan_from_meta, read_meta
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.inference import forward_logits

    plan = plan_from_meta(read_meta(iter_dir), tp=tp, pp=pp)
    model = build_model(plan.arch, plan.padded_vocab_size, parallel_output=False)
    load_checkpoint_into_model(model, iter_dir)
    model.eval()
    return forward_logits(model, tokens)


def _write_torch_dist(hf_dir, out_dir, tp, pp):
    """hf2mcore --format torch_dist, rank by rank, through the converter's own rank function."""
    import torch.distributed as dist

    from megatron_patch.convert.hf_io import read_config
    from megatron_patch.convert.hf_to_mcore import _torch_dist_rank, make_plan
    from megatron_patch.convert.mcore_io import TRACKER, write_meta

    iter_dir = Path(out_dir) / "release"
    _torch_dist_rank(hf_dir, str(iter_dir), None, tp, pp, 0, 128, "float32")
    dist.barrier()
    if dist.get_rank() == 0:
        hf_config = read_config(hf_dir)
        write_meta(iter_dir, make_plan(hf_config, tp, pp), "torch_dist", "local", hf_config, torch.float32)
        (Path(out_dir) / TRACKER).write_text("release")
    dist.barrier()
    return iter_dir


def parity_job(variants: list[dict], tokens: torch.Tensor, tp: int, pp: int, exports: list[tuple[str, str]]):
    """For each variant: write torch_dist from HF, then run the torch_dist and the legacy checkpoint at TP x PP.

    Returns, on the rank holding the full logits, {name: {"torch_dist": logits, "legacy": logits}} (padded vocab);
    None on the others. ``exports``: (torch_dist dir, HF out dir) pairs to convert back (world size 1 only).
    """
    from megatron.core import parallel_state

    from megatron_patch.convert.mcore_io import resolve_checkpoint
    from megatron_patch.convert.mcore_to_hf import mcore_to_hf
    from megatron_patch.runtime import init_distributed

    init_distributed(tp, pp)
    results = {}
    for variant in variants:
        dist_dir = _write_torch_dist(variant["hf_dir"], variant["torch_dist_dir"], tp, pp)
        results[variant["name"]] = {
            "torch_dist": _logits(dist_dir, tokens, tp, pp),
            "legacy": _logits(resolve_checkpoint(variant["legacy_dir"]), tokens, tp, pp),
        }
    for src, dst in exports:
        mcore_to_hf(src, dst)
    _stop_checkpoint_queue_manager()
    holder = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return results if holder else None


def _stop_checkpoint_queue_manager() -> None:
    """dist_checkpointing.save starts a multiprocessing Manager process (for its write-result queue) and leaves it to
    interpreter exit to stop; a rank the launcher has to terminate would orphan it, holding the test's stdout open.
    Stop it while the rank still runs (private attribute of megatron-core 0.16; best effort)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None
