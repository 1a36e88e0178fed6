"""Rollouts as tensors, and the forward-only passes that turn them into experience, through megatron-core's
pipeline schedule (any TP x PP).

Layout of a rollout batch of ``S`` samples, sequence budget ``L`` (``--seq-length``), response budget ``R``
(``--max-new-tokens``):
  - ``tokens (S, L)``: prompt, then response, then padding on the right. Causal attention means a real token never
    attends to the padding after it, so no attention mask is needed and rows of different prompt lengths share
    the batch.
  - ``labels (S, L)``: ``tokens`` shifted left by one (the token each position predicts).
  - ``starts (S,)``: the position whose logits predict response token 0 (``prompt_len - 1``); response token ``t``
    is predicted at ``starts + t``. ``gather_response`` turns any per-position ``(S, L)`` tensor (log-probs,
    entropy, values) into the ``(S, R)`` response layout of ``core_algos``.
  - ``response_mask (S, R)``: 1 up to and including EOS.
  - ``last_index (S,)``: the last real token (where the reward model reads its score).
Every rank of a pipeline holds the whole batch; the last stage computes the results and broadcasts them to the
other stages, so every rank goes on with identical experience (and computes identical advantages).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ...runtime.device import HOST, local_device
from ...training.step import schedule_pass

ROW_KEYS = ("tokens", "position_ids", "labels", "starts", "last_index", "response_mask")


def build_rollout_batch(prompts: list[list[int]], responses: list[list[int]], seq_length: int, max_new_tokens: int,
                        pad: int) -> dict[str, torch.Tensor]:
    """The tensors of a rollout (see the module docstring), built on the host and moved once to the device."""
    count = len(prompts)
    tokens = torch.full((count, seq_length + 1), pad, dtype=torch.long, device=HOST)
    response_mask = torch.zeros(count, max_new_tokens, device=HOST)
    starts = torch.zeros(count, dtype=torch.long, device=HOST)
    last_index = torch.zeros(count, dtype=torch.long, device=HOST)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = prompt + response
        tokens[i, :len(row)] = torch.tensor(row, device=HOST)
        response_mask[i, :len(response)] = 1.0
        starts[i], last_index[i] = len(prompt) - 1, len(row) - 1
    device = local_device()
    return {
        "tokens": tokens[:, :-1].contiguous().to(device),
        "labels": tokens[:, 1:].contiguous().to(device),
        "position_ids": torch.arange(seq_length, device=device).expand(count, -1).contiguous(),
        "starts": starts.to(device),
        "last_index": last_index.to(device),
        "response_mask": response_mask.to(device),
    }


def gather_response(per_position: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``(b, L)`` per-position values -> ``(b, length)`` at positions ``starts + t`` (clamped inside the row; the
    clamped positions lie beyond the response and are masked by ``response_mask``)."""
    offsets = torch.arange(length, device=starts.device)
    index = (starts[:, None] + offsets).clamp(max=per_position.shape[1] - 1)
    return per_position.gather(1, index)


def split_rows(batch: dict[str, torch.Tensor], size: int, order: torch.Tensor | None = None) -> list[dict]:
    """Micro-batches of ``size`` rows (in ``order`` when given) of every tensor in ``batch``."""
    count = next(iter(batch.values())).shape[0]
    index = torch.arange(count, device=local_device()) if order is None else order
    return [{key: value[index[i:i + size]] for key, value in batch.items()} for i in range(0, count, size)]


def _broadcast_from_last_stage(result: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return result
    if result is None:
        result = torch.empty(shape, dtype=torch.float32, device=local_device())
    dist.broadcast(result, parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return result


def forward_only(model, microbatches: list[dict], seq_length: int,
                 compute: Callable[[dict, torch.Tensor], torch.Tensor], width: int) -> torch.Tensor:
    """Run ``model`` over ``microbatches`` (forward only, through the pipeline schedule); on the last stage
    ``compute(microbatch, output) -> (rows, width)`` fp32; returns the concatenation ``(S, width)`` on every rank."""
    def forward_step(data_iterator, stage):
        microbatch = next(data_iterator)
        output = stage(microbatch["tokens"], microbatch["position_ids"], None)

        def collect(out):
            return out.new_zeros(()), {"result": compute(microbatch, out).detach().float()}

        return output, collect

    collected = schedule_pass(model, forward_step, iter(microbatches), len(microbatches), seq_length,
                              microbatches[0]["tokens"].shape[0], forward_only=True)
    rows = sum(m["tokens"].shape[0] for m in microbatches)
    result = torch.cat([c["result"] for c in collected]) if parallel_state.is_pipeline_last_stage() else None
    return _broadcast_from_last_stage(result, (rows, width))
