"""Module-level worker functions for run_on_local_ranks (importable by spawned processes)."""

from __future__ import annotations


def whiten_over_group_worker(values: list, mask: list) -> tuple[list, float]:
    """Each rank whitens its own rows over the world group; returns (its whitened rows, the global masked mean)."""
    import os

    import torch
    import torch.distributed as dist

    from megatron_patch.rlhf.algos.core_algos import masked_mean, masked_whiten

    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    rows = torch.tensor(values[rank], dtype=torch.float32)
    row_mask = torch.tensor(mask[rank], dtype=torch.float32)
    group = dist.group.WORLD
    return masked_whiten(rows, row_mask, group=group).tolist(), float(masked_mean(rows, row_mask, group=group))


def vocab_parallel_worker(logits: list, labels: list, weights: list, vocab_size: int | None) -> dict:
    """This rank's shard of ``logits`` through vocab_parallel_logprobs_and_entropy over the world group; returns
    log-probs, entropy and the gradient of ``sum(w0 * logprob + w1 * entropy)`` with respect to the shard."""
    import torch
    import torch.distributed as dist

    from megatron_patch.rlhf.algos.logprobs import vocab_parallel_logprobs_and_entropy

    dist.init_process_group("gloo")
    full = torch.tensor(logits, dtype=torch.float32)
    shard_size = full.shape[-1] // dist.get_world_size()
    rank = dist.get_rank()
    shard = full[..., rank * shard_size:(rank + 1) * shard_size].clone().requires_grad_()
    w = torch.tensor(weights, dtype=torch.float32)
    logprob, entropy = vocab_parallel_logprobs_and_entropy(shard, torch.tensor(labels), dist.group.WORLD, vocab_size)
    (w[0] * logprob + w[1] * entropy).sum().backward()
    return {"logprob": logprob.tolist(), "entropy": entropy.tolist(), "grad": shard.grad.tolist()}


def reward_model_worker(cfg: dict) -> dict:
    from megatron_patch.rlhf.preference.train_reward_model import run

    return run(cfg, quiet=True)


def dpo_worker(cfg: dict, beta: float) -> dict:
    from megatron_patch.rlhf.preference.dpo import run

    return run(cfg, beta=beta, quiet=True)


def export_and_score_worker(load: str, save: str, tokens: list[list[int]], last_index: list[int]) -> list[float]:
    """Export a reward checkpoint to HF, then score ``tokens`` with the megatron reward model (TP1 PP1)."""
    import torch

    from megatron_patch.models.builder import transformer_config
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.rlhf.export import reward_model_to_hf
    from megatron_patch.rlhf.preference.reward_model import (
        build_reward_model,
        load_reward_model_weights,
        sequence_rewards,
    )

    reward_model_to_hf(load, save)
    ckpt = Checkpoint.open(load)
    spec = ckpt.spec
    model = build_reward_model(spec.arch, spec.padded_vocab_size, transformer_config(spec.arch))
    load_reward_model_weights(model, ckpt.iter_dir)
    model.eval()
    ids = torch.tensor(tokens)
    with torch.no_grad():
        scores = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    return sequence_rewards(scores, torch.tensor(last_index)).tolist()


def rl_worker(cfg: dict, rl: dict) -> dict:
    from megatron_patch.rlhf.ppo.loop import run

    return run(cfg, rl, quiet=True)


def rl_weights_worker(cfg: dict, rl: dict) -> dict:
    """``rl_worker``'s result plus the actor's parameters (name -> host array) before and after training."""
    from megatron_patch.rlhf.ppo.config import RLConfig
    from megatron_patch.rlhf.ppo.loop import train
    from megatron_patch.rlhf.ppo.setup import build_run
    from megatron_patch.training.arguments import TrainConfig

    run = build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), RLConfig.from_dict(rl), quiet=True)

    def weights() -> dict:
        return {name: p.detach().cpu().numpy().copy() for name, p in run.actor.model.module.named_parameters()}

    before = weights()
    try:
        train(run)
    finally:
        run.logger.close()
    return {"history": run.history, "first": run.first, "before": before, "after": weights()}


def _register_test_rewards() -> None:
    """A dense reward a random tiny model earns often from the start (a quarter of the vocabulary), so a few
    iterations show it rising; registered at import so spawned and forked ranks both have it."""
    from megatron_patch.rlhf.ppo.rewards import register_reward, reward_names

    if "test_low_ids" in reward_names():
        return

    @register_reward("test_low_ids")
    def _low_ids(tokenizer, max_new_tokens):
        return lambda sample: [float(t < 128) / max_new_tokens for t in sample.response_ids]


_register_test_rewards()


def greedy_digit_match_worker(checkpoint: str, prompts_path: str, max_new_tokens: int) -> float:
    """Mean digit_match of greedy answers of ``checkpoint`` to the prompts of ``prompts_path`` (one rank), written
    without the RL loop's evaluation code: the generation engine, the tokenizer and the score function only."""
    import json

    from megatron_patch.data.tokenizers import load_tokenizer
    from megatron_patch.generation import GenerationEngine, SamplingParams, load_model
    from megatron_patch.rlhf.ppo.rewards import digit_match_score
    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1)
    records = [json.loads(line) for line in open(prompts_path)]
    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(str(loaded.assets_dir))
    engine = GenerationEngine(loaded.model, loaded.vocab_size, tokenizer.eod, loaded.max_sequence_length)
    answers = engine.generate([tokenizer.encode(r["prompt"]) for r in records], max_new_tokens, SamplingParams(top_k=1))
    texts = [tokenizer.decode([t for t in a if t != tokenizer.eod]) for a in answers]
    return sum(digit_match_score(t, r["answer"]) for t, r in zip(texts, records)) / len(records)


def sft_worker(cfg: dict) -> list:
    from megatron_patch.training.loop import run

    return run(cfg, quiet=True)


def _parameter_report(module, before: dict) -> dict:
    """Which parameters of ``module`` are trainable and which changed since ``before`` (name -> tensor)."""
    import torch

    return {"trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
            "changed": sorted(n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n]))}


def dpo_lora_worker(cfg: dict, beta: float) -> dict:
    """DPO with LoRA (one rank): trains, saves; then, on the first training micro-batch, the reference's summed
    response log-probs (the policy with adapters off, as the objective computes them) and the trained policy's, with
    the rows they were computed on."""
    import torch

    from megatron_patch.data.loader import MicroBatchIterator
    from megatron_patch.rlhf.preference.dpo import build_run, sequence_logps
    from megatron_patch.rlhf.preference.trainer import train_to_end
    from megatron_patch.rlhf.roles import BaseOfActor
    from megatron_patch.rlhf.schedule_utils import pairs_to_rows
    from megatron_patch.training.arguments import TrainConfig

    run = build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), beta, quiet=True)
    module = run.trained.model.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    out = train_to_end(run)
    microbatch = next(MicroBatchIterator(run.train_data, run.cfg.micro_batch_size, 1, 0))
    _, inputs = run.objective.schedule_inputs(run, [microbatch])
    _, reference_logps = next(inputs)
    rows = pairs_to_rows(microbatch, next(module.parameters()).device)
    module.eval()
    with torch.no_grad():
        logits = module(rows["tokens"], rows["position_ids"], None)
        policy_logps = sequence_logps(rows, run.trained.source.spec.vocab_size, logits)
    return {**out, **_parameter_report(module, before), "shared_reference": isinstance(run.frozen, BaseOfActor),
            "reference_logps": reference_logps.tolist(), "policy_logps": policy_logps.tolist(),
            "rows": {key: rows[key].tolist() for key in ("tokens", "labels", "loss_mask")}}


def rl_lora_worker(cfg: dict, rl: dict) -> dict:
    """GRPO / PPO with LoRA (one rank): trains, saves; then, on the first iteration's rollout, the response log-probs
    of the reference (the actor with adapters off, as the loop computes them) and of the trained actor."""
    import torch

    from megatron_patch.rlhf.ppo.config import RLConfig
    from megatron_patch.rlhf.ppo.experience import build_rollout_batch, forward_only, split_rows
    from megatron_patch.rlhf.ppo.loop import train
    from megatron_patch.rlhf.ppo.losses import LossSettings, response_logprobs
    from megatron_patch.rlhf.ppo.setup import build_run
    from megatron_patch.rlhf.roles import BaseOfActor, reference_stage
    from megatron_patch.training.arguments import TrainConfig

    run = build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), RLConfig.from_dict(rl), quiet=True)
    module = run.actor.model.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    try:
        train(run)
    finally:
        run.logger.close()
    first, width = run.first, run.rl.max_new_tokens
    batch = build_rollout_batch(first["prompts"], first["responses"], run.cfg.seq_length, width, run.tokenizer.pad)
    microbatches = split_rows(batch, run.cfg.micro_batch_size)
    settings = LossSettings(run.vocab_size, width, run.rl.temperature, 0, None, 0, 0, 0, "token-mean", None, None, 1, 1)

    def logprobs(model) -> list:
        return forward_only(model, microbatches, run.cfg.seq_length,
                            lambda mb, out: response_logprobs(mb, out, settings, False)[0], width).tolist()

    was_training = module.training
    with reference_stage(run.reference) as reference:
        reference_logprob = logprobs(reference)
    # the actor is left as it was: its mode, its adapters on
    assert module.training == was_training
    assert all(adapter.enabled for adapter in module.modules() if hasattr(adapter, "enabled"))
    module.eval()
    with torch.no_grad():
        policy_logprob = logprobs(run.actor.model)
    return {"history": run.history, "first": first, **_parameter_report(module, before),
            "shared_reference": isinstance(run.reference, BaseOfActor), "reference_logprob": reference_logprob,
            "policy_logprob": policy_logprob}
