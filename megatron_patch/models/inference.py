"""Forward passes through megatron-core's pipeline schedule (works at any TP x PP)."""

from __future__ import annotations

import torch


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits (batch, seq, padded_vocab) of ``tokens`` (batch, seq) on the last pipeline stage, None elsewhere.

    The model must be built with ``parallel_output=False`` so the last stage holds the full vocabulary.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)

    def forward_step(data_iterator, stage_model):
        output = stage_model(tokens, positions, None)

        def keep_logits(output_tensor):
            return output_tensor.new_zeros(()), {"logits": output_tensor.detach()}

        return output, keep_logits

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage():
        return collected[0]["logits"]
    return None
