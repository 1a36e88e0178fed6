"""PPO, GRPO and RLOO on megatron-core (any TP x PP x DP): rollouts from the weights being trained.

python -m megatron_patch.rlhf.ppo --algo grpo --load SFT_CKPT --reward exact_match --prompt-data-path p.jsonl \
    --eval-prompt-data-path held_out.jsonl --save OUT --seq-length 256 --max-new-tokens 128 --global-batch-size 64 \
    --micro-batch-size 4 --n-samples-per-prompt 8 --lr 1e-6 ...

``--algo`` is a preset (``config.PRESETS``) of knobs that can each be set alone, verl style: the advantage
estimator (``--adv-estimator``, a registry in ``algos.core_algos``), the KL in the reward and the KL loss (each with its
coefficient and estimator), the clip range (``--clip-ratio-low/high``, dual clip ``--clip-ratio-c``), reward
shaping (``--reward-clip``, ``--reward-norm``, ``--overlong-penalty``) and the loss aggregation.

One iteration (every rank runs it; a data-parallel rank handles ``--global-batch-size / dp`` prompts):
  1. rollout: the actor's GPTModel generates ``--n-samples-per-prompt`` responses per prompt with the KV-cache
     engine (temperature / top-p sampling, stop at EOS, at most ``--max-new-tokens``), at the training TP x PP;
  2. experience: forward-only passes through the pipeline schedule give the old log-probs (actor), the reference
     log-probs (with ``--lora-rank``: the actor's stage with its adapters disabled, no second model), the values
     (critic, gae only) and the scores (reward model, or the programmatic reward);
  3. advantages: the shaped rewards (minus ``kl_coef x KL`` per token with the KL in the reward) go through the
     estimator: GAE on the critic's values, or a group baseline (grpo, dr_grpo, rloo, reinforce_plus_plus_baseline)
     over the samples of one prompt, or REINFORCE++'s whitened returns;
  4. ``--ppo-epochs`` passes over ``--ppo-mini-batches`` mini-batches: one actor optimizer step each (clipped
     policy loss, entropy bonus, the KL loss, ``--ptx-coef`` x the LM loss of ``--ptx-data-path`` rows appended
     to every micro-batch) and, with a critic, one critic step (clipped value loss).
With ``--eval-prompt-data-path``, greedy answers to the held-out prompts are scored with the run's reward before
the first iteration, every ``--eval-interval`` iterations and at the end (``evaluation``; console and TensorBoard
``eval/*``): the evidence that the policy learned the task, not the training reward.
Checkpoints: ``<save>/actor`` and ``<save>/critic`` in the training layout (model, optimizer, scheduler, RNG,
iteration, prompts consumed) plus the KL controller in ``<save>/actor/iter_*/rl_state.json``; a run restarted with
the same ``--save`` resumes there and continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ...generation import SamplingParams
from ...runtime.device import HOST, local_device
from ...training.arguments import TrainConfig, add_config_arguments, config_from_args
from ...training.checkpointing import save_checkpoint
from ...training.entry import add_entry_arguments, run_entry
from ...training.step import TrainedModel, optimizer_step
from ..algos import core_algos
from ..preference.reward_model import sequence_rewards, write_reward_marker
from ..roles import reference_stage
from .config import RLConfig, add_rl_arguments, rl_config_from_args
from .evaluation import evaluate, make_sample
from .experience import build_rollout_batch, forward_only, gather_response, split_rows
from .losses import (
    ACTOR_REPORT,
    CRITIC_REPORT,
    LossSettings,
    actor_loss,
    critic_loss,
    reduce_report,
    response_logprobs,
)
from .rollout_data import Prompt
from .run import RL_STATE, RLRun
from .setup import build_run, check_run

TOKEN_WEIGHTED = {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "vf_clipfrac"}


# --------------------------------------------------------------------------------------------------------------
# 1-3: rollout, experience, advantages
# --------------------------------------------------------------------------------------------------------------


def rollout(run: RLRun) -> tuple[list[Prompt], list[list[int]], torch.Tensor]:
    """This data-parallel rank's prompts (each repeated n times), their sampled responses, and group ids."""
    rl, per_rank = run.rl, run.cfg.global_batch_size // run.dp
    records = run.prompts.take_records(run.state.consumed_train_samples + run.dp_rank * per_rank, per_rank)
    samples = [p for p in records for _ in range(rl.n_samples_per_prompt)]
    group_ids = torch.arange(per_rank, device=local_device()).repeat_interleave(rl.n_samples_per_prompt)
    # The seed depends on the iteration and the data-parallel rank only: a resumed run samples what an
    # uninterrupted one samples, and the TP / PP ranks of one replica agree (the engine broadcasts the choice).
    sampling = SamplingParams(top_k=0, top_p=0.0 if rl.top_p >= 1.0 else rl.top_p, temperature=rl.temperature,
                              seed=run.cfg.seed + 100003 * run.state.iteration + 7919 * run.dp_rank)
    with inference_mode(run):
        responses = run.engine.generate([p.ids for p in samples], rl.max_new_tokens, sampling)
    return samples, responses, group_ids


class inference_mode:  # noqa: N801 - used as a context manager, like torch.no_grad
    """The actor in eval mode (megatron-core's KV-cache attention path) for generation, back in train mode after."""

    def __init__(self, run: RLRun):
        self.module = run.actor.model.module

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train()


def task_rewards(run: RLRun, samples: list[Prompt], responses, microbatches) -> torch.Tensor:
    """``(S, R)`` rewards of the task (before any KL term): the reward model's score (or a scalar of the reward
    function) on each row's last response token, or the reward function's per-token rewards."""
    width = run.rl.max_new_tokens
    if run.reward is None:
        scores = forward_only(run.reward_model, microbatches, run.cfg.seq_length,
                              lambda mb, out: sequence_rewards(out, mb["last_index"])[:, None], 1)[:, 0]
        return core_algos.scores_to_token_rewards(scores, microbatches_mask(microbatches))
    rows = torch.zeros(len(samples), width, device=HOST)  # filled from Python values, then moved once
    for i, (prompt, response) in enumerate(zip(samples, responses)):
        score = run.reward(make_sample(run.tokenizer, prompt, response), run.prompts.path)
        if isinstance(score, list):
            per_token = torch.tensor(score[:len(response)], dtype=torch.float32, device=HOST)
            rows[i, :len(per_token)] = per_token
        else:
            rows[i, len(response) - 1] = float(score)
    return rows.to(local_device())


def microbatches_mask(microbatches: list[dict]) -> torch.Tensor:
    return torch.cat([mb["response_mask"] for mb in microbatches])


def shape_rewards(run: RLRun, token_rewards: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor,
                  dp_group) -> torch.Tensor:
    """The task rewards after the run's shaping knobs, in this order: ``--overlong-penalty`` (subtracted on the last
    token of a response without EOS), ``--reward-clip`` (each token reward into ``[-c, c]``), ``--reward-norm``
    (the outcome scores whitened over the batch of every data-parallel rank; the result is an outcome score)."""
    rl = run.rl
    if rl.overlong_penalty > 0:
        penalty = torch.where(finished, 0.0, -rl.overlong_penalty).to(token_rewards.dtype)
        token_rewards = token_rewards + core_algos.scores_to_token_rewards(penalty, mask)
    if rl.reward_clip > 0:
        token_rewards = token_rewards.clamp(-rl.reward_clip, rl.reward_clip) * mask
    if rl.reward_norm:
        scores = token_rewards.sum(-1)
        whitened = core_algos.masked_whiten(scores, torch.ones_like(scores), group=dp_group)
        token_rewards = core_algos.scores_to_token_rewards(whitened, mask)
    return token_rewards


def make_experience(run: RLRun, samples: list[Prompt], responses, group_ids) -> tuple[dict, dict]:
    """The experience batch (``(S, ...)`` tensors on every rank of the replica) and its metrics."""
    rl, cfg = run.rl, run.cfg
    batch = build_rollout_batch([p.ids for p in samples], responses, cfg.seq_length, rl.max_new_tokens,
                                run.tokenizer.pad)
    microbatches = split_rows(batch, cfg.micro_batch_size)
    settings = LossSettings(run.vocab_size, rl.max_new_tokens, rl.temperature, 0, None, 0, 0, 0, "token-mean",
                            None, None, 1, 1)
    width = rl.max_new_tokens
    batch["old_logprob"] = forward_only(run.actor.model, microbatches, cfg.seq_length,
                                        lambda mb, out: response_logprobs(mb, out, settings, False)[0], width)
    with reference_stage(run.reference) as reference:  # with LoRA: the actor's stage, adapters off
        batch["ref_logprob"] = forward_only(reference, microbatches, cfg.seq_length,
                                            lambda mb, out: response_logprobs(mb, out, settings, False)[0], width)
    mask = batch["response_mask"]
    token_rewards = task_rewards(run, samples, responses, microbatches) * mask
    scores = token_rewards.sum(-1)
    dp_group = parallel_state.get_data_parallel_group() if run.dp > 1 else None
    finished = torch.tensor([bool(r) and r[-1] == run.tokenizer.eod for r in responses], device=local_device())
    rewards = shape_rewards(run, token_rewards, mask, finished, dp_group)
    metrics = {}
    if rl.use_kl_in_reward:
        kl_rewards, _ = core_algos.compute_kl_shaped_rewards(
            torch.zeros_like(scores), batch["old_logprob"], batch["ref_logprob"], mask, run.kl_ctl.value, rl.kl_penalty)
        rewards = rewards + kl_rewards
    if run.critic is not None:
        batch["values"] = forward_only(
            run.critic.model, microbatches, cfg.seq_length,
            lambda mb, out: gather_response(out[..., 0].float(), mb["starts"], width), width)
    config = core_algos.AdvantageConfig(gamma=rl.gamma, lam=rl.lam, whiten=True, norm_by_std=rl.grpo_norm_by_std)
    advantages, returns = core_algos.get_adv_estimator(rl.adv_estimator)(
        rewards, mask, config, values=batch.get("values"), group_ids=group_ids, dp_group=dp_group)
    if run.critic is not None:
        batch["returns"] = returns
        metrics["critic/explained_variance"] = core_algos.explained_variance(batch["values"], returns, mask,
                                                                             group=dp_group)
    # The KL to the reference (k1, summed over the response) is reported whatever the knobs: the controller reads it.
    metrics["actor/kl_sum"] = (core_algos.kl_penalty(batch["old_logprob"], batch["ref_logprob"], "k1") * mask).sum(-1).mean()
    batch["advantages"] = advantages
    metrics["reward/mean"] = scores.mean()
    # Spread statistics over the whole batch (all data-parallel ranks), not a mean of per-rank ones; the means
    # above are exact as every rank holds the same number of samples.
    everyone = torch.ones_like(scores)
    metrics["reward/std"] = (core_algos.masked_var(scores, everyone, group=dp_group).sqrt()
                             if scores.numel() * run.dp > 1 else scores.new_zeros(()))
    metrics["response/length"] = mask.sum(-1).mean()
    metrics["response/no_eos"] = (~finished).float().mean()
    metrics["actor/kl_coef"] = scores.new_tensor(run.kl_ctl.value)
    return batch, metrics


# --------------------------------------------------------------------------------------------------------------
# 4: PPO epochs over mini-batches
# --------------------------------------------------------------------------------------------------------------


def _global_counts(mask: torch.Tensor, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.stack(core_algos.count_tokens_and_sequences(mask)).to(torch.float64)
    if dp > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts[0].float(), counts[1].float()


def _forward_step(loss_func, data_iterator, model):
    microbatch = next(data_iterator)
    output = model(microbatch["tokens"], microbatch["position_ids"], None)
    return output, partial(loss_func, microbatch)


def _train_step(trained: TrainedModel, microbatches: list[dict], loss_func, cfg: TrainConfig) -> list[dict]:
    """``training.step.optimizer_step`` over a mini-batch's micro-batches; the scheduler counts each optimizer step
    as ``--global-batch-size`` samples (``setup.build_run`` sized the schedule so)."""
    result = optimizer_step(trained, partial(_forward_step, loss_func), iter(microbatches), len(microbatches),
                            cfg.seq_length, microbatches[0]["tokens"].shape[0], cfg.global_batch_size)
    return result.reports


def ptx_position(step: int, dp: int, dp_rank: int, rows_per_rank: int) -> int:
    """The first PTX row data-parallel rank ``dp_rank`` reads at optimizer step ``step``: the step reads the next
    ``rows_per_rank x dp`` rows and each rank its own share, so no two ranks (or steps) read the same rows."""
    return (step * dp + dp_rank) * rows_per_rank


def _with_ptx(run: RLRun, microbatches: list[dict], step: int) -> list[dict]:
    """Append ``micro-batch-size`` pretraining rows to each micro-batch (after its experience rows). Optimizer step
    ``step`` of the run reads the next ``len(microbatches) x micro-batch-size x dp`` rows, data-parallel rank ``r``
    the ``r``-th share of them, so the ranks train on different text."""
    size = run.cfg.micro_batch_size
    position = ptx_position(step, run.dp, run.dp_rank, len(microbatches) * size)
    out = []
    for i, microbatch in enumerate(microbatches):
        ptx = {k: v.to(local_device()) for k, v in run.ptx.batch(position + i * size, size).items()}
        positions = microbatch["position_ids"][:1].expand(size, -1)
        out.append({**microbatch, "tokens": torch.cat([microbatch["tokens"], ptx["tokens"]]),
                    "position_ids": torch.cat([microbatch["position_ids"], positions]),
                    "ptx_labels": ptx["labels"], "ptx_loss_mask": ptx["loss_mask"]})
    return out


def train_on_experience(run: RLRun, batch: dict) -> dict[str, float]:
    rl, cfg = run.rl, run.cfg
    count = run.samples_per_rank
    mini_size = count // rl.ppo_mini_batches
    generator = torch.Generator().manual_seed(cfg.seed + run.state.iteration)
    actor_reports, critic_reports, step = [], [], 0
    for _ in range(rl.ppo_epochs):
        order = torch.randperm(count, generator=generator).to(local_device())
        for start in range(0, count, mini_size):
            mini = {key: value[order[start:start + mini_size]] for key, value in batch.items()}
            microbatches = split_rows(mini, cfg.micro_batch_size)
            num_tokens, num_seqs = _global_counts(mini["response_mask"], run.dp)
            settings = LossSettings(run.vocab_size, rl.max_new_tokens, rl.temperature, rl.clip_ratio,
                                    rl.value_clip if rl.value_clip > 0 else None, rl.entropy_coef,
                                    rl.kl_loss_coef if rl.use_kl_loss else 0.0, rl.ptx_coef, rl.loss_agg_mode,
                                    num_tokens, num_seqs, len(microbatches), run.dp, rl.clip_ratio_low,
                                    rl.clip_ratio_high, rl.clip_ratio_c, rl.kl_loss_type)
            actor_batches = microbatches
            if run.ptx is not None:
                run_step = run.state.iteration * rl.ppo_epochs * rl.ppo_mini_batches + step
                actor_batches = _with_ptx(run, microbatches, run_step)
            reduced = _train_step(run.actor, actor_batches, partial(actor_loss, settings), cfg)
            actor_reports.append(reduce_report(reduced, "actor", ACTOR_REPORT, TOKEN_WEIGHTED))
            if run.critic is not None:
                reduced = _train_step(run.critic, microbatches, partial(critic_loss, settings), cfg)
                critic_reports.append(reduce_report(reduced, "critic", CRITIC_REPORT, TOKEN_WEIGHTED))
            step += 1
    metrics = {f"actor/{k}": sum(r[k] for r in actor_reports) / len(actor_reports) for k in ACTOR_REPORT}
    if critic_reports:
        metrics.update({f"critic/{k}": sum(r[k] for r in critic_reports) / len(critic_reports)
                        for k in CRITIC_REPORT})
    metrics["actor/first_pg_loss"] = actor_reports[0]["pg_loss"]
    return metrics


# --------------------------------------------------------------------------------------------------------------
# The loop, metrics, checkpoints
# --------------------------------------------------------------------------------------------------------------


def _dp_mean(values: dict[str, torch.Tensor], dp: int) -> dict[str, float]:
    stacked = torch.stack([v.detach().float().to(local_device()) for v in values.values()])
    if dp > 1:
        dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
        stacked = stacked / dp
    return dict(zip(values, stacked.tolist()))


def iteration(run: RLRun) -> dict[str, float]:
    """One RL iteration; returns its metrics (the same on every rank)."""
    t0 = time.perf_counter()
    samples, responses, group_ids = rollout(run)
    t1 = time.perf_counter()
    batch, experience_metrics = make_experience(run, samples, responses, group_ids)
    t2 = time.perf_counter()
    metrics = _dp_mean(experience_metrics, run.dp)
    if run.first is None:
        run.first = {key: batch[key].tolist() for key in ("old_logprob", "ref_logprob", "advantages",
                                                          "response_mask")}
        run.first.update(prompts=[p.ids for p in samples], responses=responses, group_ids=group_ids.tolist())
    metrics.update(train_on_experience(run, batch))
    t3 = time.perf_counter()
    metrics.update({"time/generation": t1 - t0, "time/experience": t2 - t1, "time/training": t3 - t2})
    run.kl_ctl.update(metrics["actor/kl_sum"], run.cfg.global_batch_size * run.rl.n_samples_per_prompt)
    run.state.iteration += 1
    run.state.consumed_train_samples += run.cfg.global_batch_size
    return metrics


def held_out(run: RLRun) -> dict[str, float] | None:
    """Held-out greedy evaluation (``evaluation.evaluate``) at the current iteration, logged; None without
    ``--eval-prompt-data-path``. With a reward model the score is the reward model's (a frozen proxy)."""
    if run.eval_prompts is None:
        return None
    with inference_mode(run):
        metrics = evaluate(run.engine, run.tokenizer, run.reward, run.eval_prompts, run.rl.max_new_tokens,
                           run.dp_rank, run.dp, parallel_state.get_data_parallel_group() if run.dp > 1 else None)
    step = run.state.iteration
    run.evals.append((step, metrics))
    if run.logger.writer is not None:
        for key, value in metrics.items():
            run.logger.writer.add_scalar(key, value, step)
    match = f" | exact match {metrics['eval/exact_match']:.3f}" if "eval/exact_match" in metrics else ""
    run.logger.print(f"held-out {step:5d} | reward {metrics['eval/reward']:.4f}{match} | distinct "
                     f"{metrics['eval/distinct']:.3f} | length {metrics['eval/length']:.1f} "
                     f"({len(run.eval_prompts)} prompts, greedy)")
    return metrics


def _log(run: RLRun, step: int, metrics: dict[str, float]) -> None:
    if run.logger.writer is not None:
        for key, value in metrics.items():
            run.logger.writer.add_scalar(key, value, step)
    if run.logger.line_due(step):  # every --log-interval iterations, and at least every 30 s
        m = metrics
        critic = (f" | vf loss {m['critic/vf_loss']:.4f} | expl var {m['critic/explained_variance']:.3f}"
                  if "critic/vf_loss" in m else "")
        run.logger.print(
            f"iteration {step:5d} | reward {m['reward/mean']:.4f} +- {m['reward/std']:.4f} | kl {m['actor/kl_sum']:.4f}"
            f" | pg loss {m['actor/pg_loss']:.4f} | clipfrac {m['actor/pg_clipfrac']:.3f} | approx kl "
            f"{m['actor/ppo_kl']:.4f} | entropy {m['actor/entropy']:.3f}{critic} | length "
            f"{m['response/length']:.1f} | time gen/exp/train {m['time/generation']:.2f}/"
            f"{m['time/experience']:.2f}/{m['time/training']:.2f} s")


def write_configs(run: RLRun) -> None:
    """The resolved training and RL configs next to the checkpoints (rank 0), once the first iteration ran: a run
    refused at its first rollout (a failing reward function) leaves nothing behind."""
    if run.cfg.save and dist.get_rank() == 0:
        run.cfg.write(run.cfg.save)
        with open(os.path.join(run.cfg.save, "rl_config.json"), "w") as handle:
            json.dump(run.rl.to_dict(), handle, indent=2)


def checkpoint(run: RLRun) -> None:
    save = Path(run.cfg.save)
    state = {"kl_coef": run.kl_ctl.state_dict(), "algo": run.rl.algo}

    def write_rl_state(tmp: Path) -> None:
        (tmp / RL_STATE).write_text(json.dumps(state) + "\n")

    save_checkpoint(save / "actor", run.state.iteration, run.actor.model, run.actor.optimizer, run.actor.scheduler,
                    run.state, run.actor.source, run.cfg, after_model_save=write_rl_state)
    if run.critic is not None:
        save_checkpoint(save / "critic", run.state.iteration, run.critic.model, run.critic.optimizer,
                        run.critic.scheduler, run.state, run.critic.source, run.cfg,
                        after_model_save=write_reward_marker)
    run.logger.print(f"saved iteration {run.state.iteration} to {save}")


def train(run: RLRun) -> RLRun:
    cfg, interval = run.cfg, run.cfg.eval_interval
    stop = cfg.train_iters if cfg.exit_interval is None else min(cfg.train_iters, cfg.exit_interval)
    if run.state.iteration < stop:
        held_out(run)
    started = run.state.iteration
    while run.state.iteration < stop:
        metrics = iteration(run)
        if run.state.iteration == started + 1:
            write_configs(run)
        run.history.append((run.state.iteration, metrics))
        _log(run, run.state.iteration, metrics)
        if interval and run.state.iteration % interval == 0 and run.state.iteration < stop:
            held_out(run)
        if cfg.save and cfg.save_interval and run.state.iteration % cfg.save_interval == 0 \
                and run.state.iteration < stop:
            checkpoint(run)
    if run.state.iteration > started:
        held_out(run)
    if cfg.save:
        checkpoint(run)
    return run


def run(cfg: TrainConfig | dict, rl: RLConfig | dict, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, metrics)], "evals": [(iteration, eval metrics)],
    "first": {...}}``."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict({"mode": "finetune", **cfg})
    if isinstance(rl, dict):
        rl = RLConfig.from_dict(rl)
    rl_run = build_run(cfg, rl, quiet)
    try:
        train(rl_run)
    finally:
        rl_run.logger.close()
    return {"history": rl_run.history, "evals": rl_run.evals, "first": rl_run.first}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_rl_arguments(parser)
    add_entry_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_entry(args, lambda: config_from_args(args, "finetune"), lambda cfg: run(cfg, rl_config_from_args(args)),
                     lambda cfg, world_size: check_run(cfg, rl_config_from_args(args), world_size))


if __name__ == "__main__":
    sys.exit(main())
