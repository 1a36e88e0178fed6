"""The padded vocabulary rows kept out of the language-model loss.

Megatron-LM pads the vocabulary to a multiple of divisible_by x TP (``mapping.layouts.padded_vocab_size``); the
padded rows of the output layer are zero after hf2mcore, so each adds a logit of 0 to the softmax: a converted model's
loss is ``log(padded / real)``-ish above HF's (0.023 for 2000 ids padded to 2048, measured with
``toolkits/benchmarks/hf_alignment.py``) and training spends gradient pushing those rows down. HF's model has no such
rows. The loss here sees the padded columns as -inf: a probability of exactly 0, no gradient into them, the loss and
its gradient equal to HF's. Only the loss changes; the logits the model returns (generation, verify) are unchanged.

Tensor parallelism: each rank holds a contiguous slice of the vocabulary columns, so each masks the columns of its
own slice at or beyond the real vocabulary size, with no communication.
"""

from __future__ import annotations

import types

import torch
from megatron.core import parallel_state


def padded_column_mask(local_columns: int, tp_rank: int, vocab_size: int, device=None) -> torch.Tensor | None:
    """Boolean (local_columns,) mask of this TP rank's columns that are padding, or None when it has none."""
    start = tp_rank * local_columns
    if start + local_columns <= vocab_size:
        return None
    return torch.arange(start, start + local_columns, device=device) >= vocab_size


def mask_vocab_padding_in_loss(model, vocab_size: int):
    """Make ``model`` (a megatron-core GPTModel stage holding the output layer) compute its language-model loss
    with the columns at or beyond ``vocab_size`` masked out. A no-op when the vocabulary has no padding."""
    plain = model.compute_language_model_loss

    def compute_language_model_loss(self, labels, logits):
        mask = padded_column_mask(logits.shape[-1], parallel_state.get_tensor_model_parallel_rank(), vocab_size,
                                  logits.device)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        return plain(labels, logits)

    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)
    return model
