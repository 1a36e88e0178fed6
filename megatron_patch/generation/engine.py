"""Batched autoregressive generation over a megatron-core GPTModel, with megatron-core's static KV cache.

Batching follows Megatron-LM's static scheme: prompts of different lengths are right-padded into one
(batch, max_prompt + max_new) token buffer; the first step encodes every row up to the shortest prompt, then each
step feeds one column. A row whose prompt is longer than the current column keeps its own prompt token instead of
the sampled one, so every cached position holds a real token of that row and no padding mask is needed: a row's
result equals generating it alone.

The cache is megatron-core's ``StaticInferenceContext``, passed to ``GPTModel.forward`` as ``inference_context``:
each attention layer keeps (max_seq, batch, groups, head_dim) key/value buffers and, after the first step, a step
costs one token's forward. It runs unchanged on the CPU path with the local layer spec. ``use_cache=False`` re-runs
the whole prefix every step (the reference the cache is tested against).

Tensor parallelism: the model is built with ``parallel_output=False`` so every TP rank sees the full vocabulary;
TP rank 0 picks the tokens and broadcasts them, so all ranks feed identical inputs. Pipeline parallelism: each step
is one forward-only pass of megatron-core's pipeline schedule (activations sent stage to stage, the KV cache of a
stage's layers kept on that stage); the last stage picks the tokens and broadcasts them to every stage. A checkpoint
saved at any TP x PP loads at any other.

Expert parallelism: the ranks of an expert-parallel group exchange tokens inside every MoE layer, so they must run
the same number of forward passes although each generates its own prompts. With ``lockstep_group`` every step ends
with a vote over that group; a rank whose rows are done (or that has no prompts in this round) keeps running a
one-token forward, whose output it discards, until every rank of the group is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import GenerationError
from ..runtime.device import device_generator, local_device
from .sampling import SamplingParams, select_next

_LOADED_MARK = "_megatron_patch_weights_from"


def mark_weights_loaded(model: torch.nn.Module, source: str) -> None:
    """Record where ``model``'s weights came from; the engine refuses a model without this mark."""
    setattr(model, _LOADED_MARK, str(source))


def weights_source(model: torch.nn.Module) -> str | None:
    return getattr(model, _LOADED_MARK, None)


class GenerationEngine:
    """Generates continuations of token-id prompts; every rank of the model (TP x PP) holds its stage.

    Args:
        model: a GPTModel built with ``parallel_output=False`` whose weights were loaded (see ``load_model``).
        vocab_size: real vocabulary size; logits of padding rows beyond it are never sampled.
        eos_token_id: id(s) that end a row; None generates exactly ``max_new_tokens``.
        max_sequence_length: longest prompt + completion the model supports (position embeddings, SEQ_LEN).
        use_cache: use megatron-core's KV cache (one token per step) instead of re-running the prefix.
        lockstep_group: a process group whose ranks step together (expert parallelism, see above); every rank of it
            calls ``generate`` equally often, with an empty prompt list when it has none left.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, eos_token_id: int | Sequence[int] | None,
                 max_sequence_length: int, use_cache: bool = True, lockstep_group=None):
        from megatron.core import parallel_state

        if weights_source(model) is None:
            raise GenerationError("no checkpoint weights were loaded into this model; refusing to generate from "
                                  "random initialisation (load it with megatron_patch.generation.load_model)")
        self.model = model.eval()
        self.vocab_size = vocab_size
        if eos_token_id is None:
            eos_token_id = []
        self.eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.max_sequence_length = max_sequence_length
        self.use_cache = use_cache
        self._lockstep = lockstep_group
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._tp_src = parallel_state.get_tensor_model_parallel_src_rank()
        self._tp = parallel_state.get_tensor_model_parallel_world_size()
        self._pp = parallel_state.get_pipeline_model_parallel_world_size()
        self._last_stage = parallel_state.is_pipeline_last_stage()
        if self._pp > 1:
            self._pp_group = parallel_state.get_pipeline_model_parallel_group()
            self._pp_last = parallel_state.get_pipeline_model_parallel_last_rank()

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise GenerationError("no prompts to generate from")
        if max_new_tokens < 1:
            raise GenerationError(f"the output length must be >= 1 (got {max_new_tokens})")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {i} is empty after tokenization")
            if len(prompt) + max_new_tokens > self.max_sequence_length:
                raise GenerationError(
                    f"prompt {i} has {len(prompt)} tokens; with {max_new_tokens} new tokens it exceeds the maximum "
                    f"sequence length {self.max_sequence_length} (shorten the input or the output length)")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {self.vocab_size}")

    def _forward(self, tokens: torch.Tensor, start: int, context) -> torch.Tensor | None:
        """Logits (batch, vocab) of the last column of ``tokens`` (batch, n), whose first column is at ``start``;
        None on a pipeline stage other than the last."""
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        positions = positions.unsqueeze(0).expand(tokens.size(0), -1)

        def run(model):
            return model(tokens, positions, None, inference_context=context, runtime_gather_output=True)

        if self._pp == 1:
            logits = run(self.model)
        else:
            logits = self._pipelined(run, tokens.shape)
        return None if logits is None else logits[:, -1, : self.vocab_size]

    def _pipelined(self, run, shape) -> torch.Tensor | None:
        """One forward through every pipeline stage with megatron-core's schedule (activations sent stage to stage);
        the last stage's output."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            output = run(model)
            return output, lambda out: (out.new_zeros(()), {"logits": out.detach()})

        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[self.model], num_microbatches=1,
            seq_length=shape[1], micro_batch_size=shape[0], forward_only=True,
        )
        return collected[0]["logits"] if self._last_stage else None

    def _choose(self, logits, sampling, seen, generator) -> torch.Tensor:
        """The next token of each row, identical on every rank: picked on the last stage's TP rank 0, broadcast."""
        if self._last_stage:
            chosen = select_next(logits, sampling, seen, generator)
            if self._tp > 1:
                torch.distributed.broadcast(chosen, self._tp_src, group=self._tp_group)
        else:
            chosen = torch.empty(seen.size(0), dtype=torch.long, device=seen.device)  # filled by the broadcast
        if self._pp > 1:
            torch.distributed.broadcast(chosen, self._pp_last, group=self._pp_group)
        return chosen

    def _all_done(self, done: bool) -> bool:
        """Whether every rank of the lockstep group is done (each rank votes once per step)."""
        vote = torch.tensor([0 if done else 1], dtype=torch.int32, device=local_device())
        torch.distributed.all_reduce(vote, group=self._lockstep)
        return int(vote.item()) == 0

    def _idle_until_peers_done(self) -> None:
        """One-token forwards (outputs discarded) until the lockstep group's last rank is done."""
        idle = torch.zeros(1, 1, dtype=torch.long, device=local_device())
        while True:
            self._forward(idle, 0, None)
            if self._all_done(True):
                return

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams | None = None) -> list[list[int]]:
        """Continuations of ``prompts`` (lists of token ids), each ending at its first EOS (kept) or after
        ``max_new_tokens`` tokens. Every rank of the model (TP x PP) must call this with the same arguments."""
        from megatron.core.inference.contexts import StaticInferenceContext

        sampling = sampling or SamplingParams()
        if self._lockstep is not None and not prompts:
            self._idle_until_peers_done()
            return []
        self._check(prompts, max_new_tokens)
        batch = len(prompts)
        total = max(len(p) for p in prompts) + max_new_tokens
        # Every per-step tensor lives on the model's device (one copy of the prompts there, none per step).
        device = local_device()
        rows = [list(p) + [0] * (total - len(p)) for p in prompts]
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        ends = lengths + max_new_tokens  # exclusive end of each row
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        generator = device_generator(sampling.seed)
        context = StaticInferenceContext(batch, total) if self.use_cache else None

        prev = 0
        for cur in range(min(len(p) for p in prompts), total):
            if context is not None:
                logits = self._forward(tokens[:, prev:cur], prev, context)
                context.increment_sequence_len_offset(cur - prev)
                context.enable_decode_mode()
            else:
                logits = self._forward(tokens[:, :cur], 0, None)
            prev = cur
            chosen = self._choose(logits, sampling, tokens[:, :cur], generator)
            generating = (cur >= lengths) & ~done & (cur < ends)
            tokens[:, cur] = torch.where(generating, chosen, tokens[:, cur])
            done |= generating & torch.isin(chosen, eos)
            done |= cur + 1 >= ends
            if self._lockstep is not None:
                finished = bool(done.all())
                if self._all_done(finished):
                    break
                if finished:  # the others are still generating: step with them
                    self._idle_until_peers_done()
                    break
            elif bool(done.all()):
                break

        completions = []
        rows = tokens.tolist()
        for i, prompt in enumerate(prompts):
            row = rows[i][len(prompt) : min(len(prompt) + max_new_tokens, cur + 1)]
            for j, token in enumerate(row):
                if token in self.eos_ids:
                    row = row[: j + 1]
                    break
            completions.append(row)
        return completions
