"""The reward model: a megatron-core GPTModel whose output layer is a scalar head, read at the last real token.

Built by the toolkit's one GPTModel builder, then the last stage's vocabulary projection is replaced by
``RewardOutputLayer`` (hidden -> 1). Everything megatron-core does around the output layer keeps working: pipeline
stages, tensor parallelism (the head is replicated; its input, the final hidden states, is the same on every TP
rank), megatron-core DDP and the optimizer, torch_dist checkpoints.

Checkpoint layout: the LM's keys, with ``output_layer.weight`` of shape ``(1, hidden)`` (megatron-core's language
module insists on that key on the last stage), and ``reward_model.json`` beside ``megatron_patch.json``. An LM
reader meets a one-row output layer, which fails its vocabulary-size check loudly instead of loading silently.
Input embeddings are never tied to the head (a tied LM loses nothing: its embedding is loaded as is).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from ...checkpoint.megatron import read_meta
from ...checkpoint.megatron_lm_args import load_model_state
from ...errors import CheckpointError
from ...models.builder import build_model
from ...runtime.device import HOST

REWARD_MARKER = "reward_model.json"
HEAD_PREFIX = "output_layer."


class RewardOutputLayer(torch.nn.Module):
    """Stands in for GPTModel's output layer: ``[s, b, h]`` final hidden states -> ``([s, b, 1] scores, None)``.

    The head's initial weights come from a generator seeded with ``seed`` alone, so every TP rank (and every
    run) starts from the same head regardless of the RNG state of the rank.
    """

    def __init__(self, config, seed: int = 0):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        # Built on the host like the rest of the model (use_cpu_initialization), then moved with it by place_model.
        generator = torch.Generator(device=HOST).manual_seed(seed)
        init = torch.randn(1, config.hidden_size, generator=generator, device=HOST) * config.init_method_std
        self.weight = torch.nn.Parameter(init.to(config.params_dtype))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:  # the head needs every position; the LM output layer would gather too
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        return torch.nn.functional.linear(hidden_states, self.weight), None


def build_reward_model(arch, padded_vocab_size: int, config, transformer_impl: str = "local", seed: int = 0):
    """One pipeline stage of a reward model over ``arch`` (a GPTModel; the last stage ends in the scalar head)."""
    # Untied: the last stage must not hold (or all-reduce with the first stage) a copy of the embedding.
    model = build_model(replace(arch, tie_word_embeddings=False), padded_vocab_size, config=config,
                        transformer_impl=transformer_impl)
    if model.post_process:
        model.output_layer = RewardOutputLayer(config, seed).to(next(model.decoder.parameters()).device)
    return model


def is_reward_checkpoint(iter_dir: str | Path) -> bool:
    return (Path(iter_dir) / REWARD_MARKER).is_file()


def write_reward_marker(iter_dir: str | Path) -> None:
    """Mark a checkpoint directory as a reward model's (called before the checkpoint's atomic rename)."""
    (Path(iter_dir) / REWARD_MARKER).write_text(json.dumps({"head": "scalar", "read_at": "last_token"}) + "\n")


def load_reward_model_weights(model, iter_dir: str | Path) -> bool:
    """Load a torch_dist checkpoint into one reward-model stage; returns whether the head came from it.

    A reward checkpoint fills everything; an LM checkpoint (converted or SFT) fills the backbone and leaves the
    freshly initialised head: the only keys allowed to be missing are the head's (an explicit allow-list, not
    a load that ignores mismatches).
    """
    iter_dir = Path(iter_dir)
    meta = read_meta(iter_dir)
    if meta["format"] != "torch_dist":
        raise CheckpointError(f"{iter_dir} is a {meta['format']} checkpoint; the reward model loads torch_dist ones "
                              f"(convert with hf2mcore --format torch_dist)")
    with_head = is_reward_checkpoint(iter_dir)
    sharded = model.sharded_state_dict()
    if not with_head:
        sharded = {key: value for key, value in sharded.items() if not key.startswith(HEAD_PREFIX)}
    state = load_model_state(sharded, iter_dir)  # vets the files first (megatron-core unpickles without restriction)
    if not with_head:  # the allow-list: the fresh head keeps its own initial values
        state.update({key: value for key, value in model.state_dict().items() if key.startswith(HEAD_PREFIX)})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {iter_dir} does not match the reward model: "
                              f"{' '.join(str(error).split())[:300]}") from None
    return with_head


def sequence_rewards(scores: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, 1)`` per-position scores -> ``(batch,)`` fp32 score at each row's last real token."""
    return scores[..., 0].float().gather(1, last_index.unsqueeze(1)).squeeze(1)
