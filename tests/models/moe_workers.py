"""Worker functions for the MoE tests, run inside local ranks (module level, so spawned ranks can import them)."""

from __future__ import annotations

import torch


def moe_parity_job(checkpoints: dict[str, str], tokens: torch.Tensor, tp: int, pp: int, ep: int):
    """Logits of every checkpoint at TP x PP x EP (TP x PP x EP ranks); {name: logits} on the rank that holds them
    (last stage, TP rank 0, data-parallel rank 0), None on the others."""
    from megatron.core import parallel_state

    from megatron_patch.checkpoint.megatron import find_iteration_dir
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed

    init_distributed(tp, pp, expert_model_parallel_size=ep)
    results = {}
    for name, path in checkpoints.items():
        ckpt = Checkpoint.open(find_iteration_dir(path))
        model = build_model(ckpt.spec.arch, ckpt.spec.padded_vocab_size, parallel_output=False)
        ckpt.load_into(model)
        model.eval()
        results[name] = forward_logits(model, tokens)
    holder = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_data_parallel_rank() == 0)
    return results if holder else None


def requested_keys_job(iter_dirs: dict[str, str], tp: int, pp: int, ep: int):
    """{name: ({key: (global shape, [(offsets, sizes)])}, object keys)} that a GPTModel built for each checkpoint at
    TP x PP x EP asks for in its sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.runtime import init_distributed

    init_distributed(tp, pp, expert_model_parallel_size=ep)
    out = {}
    for name, iter_dir in iter_dirs.items():
        spec = Checkpoint.open(iter_dir).spec
        config = transformer_config(spec.arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
                                    perform_initialization=False)
        model = build_model(spec.arch, spec.padded_vocab_size, config=config)
        tensors, objects = {}, set()
        for value in nested_values(model.sharded_state_dict()):
            built = value.build() if isinstance(value, ShardedTensorFactory) else value
            for item in nested_values(built) if isinstance(built, (dict, list, tuple)) else [built]:
                if isinstance(item, ShardedObject):
                    objects.add(item.unique_key)
                elif isinstance(item, ShardedTensor):
                    chunk = (tuple(item.global_offset), (1,) * item.prepend_axis_num + tuple(item.local_shape))
                    tensors.setdefault(item.key, (tuple(item.global_shape), []))[1].append(chunk)
        out[name] = (tensors, objects)
    return out


def greedy_job(checkpoints: dict[str, str], prompts: list[list[int]], new_tokens: int):
    """Greedy KV-cached completions of every checkpoint at TP=1 PP=1 (one rank)."""
    from megatron_patch.generation import GenerationEngine, SamplingParams, load_model
    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1)
    results = {}
    for name, path in checkpoints.items():
        loaded = load_model(path)
        engine = GenerationEngine(loaded.model, loaded.vocab_size, None, loaded.max_sequence_length)
        results[name] = engine.generate(prompts, new_tokens, SamplingParams())
    return results


def moe_train_job(cfg: dict):
    """Train from ``cfg`` (a TrainConfig dict); on every rank ([(iteration, lm loss)], [{MoE loss: value}],
    the routed experts this rank holds in its first MoE layer)."""
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.loop import build_trainer, train

    trainer = build_trainer(TrainConfig.from_dict(cfg), quiet=True)
    local_experts = next(len(layer.mlp.experts.local_experts) for layer in trainer.trained.model.module.decoder.layers
                         if hasattr(layer.mlp, "experts"))
    history = train(trainer)
    trainer.logger.close()
    return history, trainer.moe_history, local_experts


def generate_cli_job(argv: list[str]) -> int:
    """``python -m megatron_patch.generate ARGV`` on this rank (the entry's own parsing, checks and offline loop)."""
    from megatron_patch.generate import build_parser
    from megatron_patch.generation.offline import generate_file
    from megatron_patch.runtime import destroy_distributed

    try:
        return generate_file(build_parser().parse_args(argv))
    finally:
        destroy_distributed()
