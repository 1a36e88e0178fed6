"""PPO and GRPO on megatron-core (any TP x PP x DP): rollouts from the weights being trained.

python -m megatron_patch.rlhf.ppo --algo ppo --load SFT_CKPT --reward-model RM_CKPT --prompt-data-path p.jsonl \
    --save OUT --seq-length 256 --max-new-tokens 128 --global-batch-size 64 --micro-batch-size 4 --lr 1e-6 ...

One iteration (every rank runs it; a data-parallel rank handles ``--global-batch-size / dp`` prompts):
  1. rollout: the actor's GPTModel generates ``--n-samples-per-prompt`` responses per prompt with the KV-cache
     engine (temperature / top-p sampling, stop at EOS, at most ``--max-new-tokens``), at the training TP x PP;
  2. experience: forward-only passes through the pipeline schedule give the old log-probs (actor), the reference
     log-probs, the values (critic, PPO) and the scores (reward model, or the Python reward function);
  3. advantages: PPO shapes the rewards with ``-kl_coef * KL`` per token and runs GAE on the critic's values;
     GRPO normalises each sample's score within its prompt's group (no critic; KL is a k3 loss term instead);
  4. ``--ppo-epochs`` passes over ``--ppo-mini-batches`` mini-batches: one actor optimizer step each (clipped
     policy loss, entropy bonus, GRPO's KL loss, ``--ptx-coef`` x the LM loss of ``--ptx-data-path`` rows appended
     to every micro-batch) and, for PPO, one critic step (clipped value loss).
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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.device import HOST, local_device
from ..training.arguments import TrainConfig, add_config_arguments, config_from_args
from . import core_algos
from .experience import build_rollout_batch, forward_only, gather_response, split_rows
from .rl_config import RLConfig, add_rl_arguments, rl_config_from_args
from .rl_losses import (
    ACTOR_REPORT,
    CRITIC_REPORT,
    LossSettings,
    actor_loss,
    critic_loss,
    reduce_report,
    response_logprobs,
)

RL_STATE = "rl_state.json"
TOKEN_WEIGHTED = {"pg_clipfrac", "ppo_kl", "vf_clipfrac"}


@dataclass
class RLRun:
    cfg: TrainConfig
    rl: RLConfig
    actor: object  # roles.Trained
    critic: object | None  # roles.Trained (PPO)
    reference: object
    reward_model: object | None
    reward_fn: object | None
    tokenizer: object
    prompts: object  # rollout_data.PromptDataset
    ptx: object | None  # rollout_data.PtxDataset
    engine: object
    kl_ctl: object
    state: object  # training.checkpointing.TrainerState: iteration, prompts consumed
    vocab_size: int
    logger: object
    history: list = field(default_factory=list)  # (iteration, metrics)
    first: dict | None = None  # the first iteration's rollout and tensors (tests compare them across TP/PP/DP)

    @property
    def dp(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()

    @property
    def samples_per_rank(self) -> int:
        return self.cfg.global_batch_size // self.dp * self.rl.n_samples_per_prompt


# --------------------------------------------------------------------------------------------------------------
# 1-3: rollout, experience, advantages
# --------------------------------------------------------------------------------------------------------------


def rollout(run: RLRun) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """This data-parallel rank's prompts (each repeated n times), their sampled responses, and group ids."""
    from megatron.core import parallel_state

    from ..generation import SamplingParams

    rl, per_rank = run.rl, run.cfg.global_batch_size // run.dp
    dp_rank = parallel_state.get_data_parallel_rank()
    prompts = run.prompts.take(run.state.consumed_train_samples + dp_rank * per_rank, per_rank)
    samples = [p for p in prompts for _ in range(rl.n_samples_per_prompt)]
    group_ids = torch.arange(per_rank, device=local_device()).repeat_interleave(rl.n_samples_per_prompt)
    # The seed depends on the iteration and the data-parallel rank only: a resumed run samples what an
    # uninterrupted one samples, and the TP / PP ranks of one replica agree (the engine broadcasts the choice).
    sampling = SamplingParams(top_k=0, top_p=0.0 if rl.top_p >= 1.0 else rl.top_p, temperature=rl.temperature,
                              seed=run.cfg.seed + 100003 * run.state.iteration + 7919 * dp_rank)
    run.actor.model.module.eval()  # inference mode for megatron-core's KV-cache attention path
    try:
        responses = run.engine.generate(samples, rl.max_new_tokens, sampling)
    finally:
        run.actor.model.module.train()
    return samples, responses, group_ids


def task_rewards(run: RLRun, samples, responses, microbatches) -> torch.Tensor:
    """``(S, R)`` rewards of the task (before any KL term): the reward model's score (or a scalar of the reward
    function) on each row's last response token, or the reward function's per-token rewards."""
    width = run.rl.max_new_tokens
    if run.reward_fn is None:
        from .reward_model import sequence_rewards

        scores = forward_only(run.reward_model, microbatches, run.cfg.seq_length,
                              lambda mb, out: sequence_rewards(out, mb["last_index"])[:, None], 1)[:, 0]
        return core_algos.scores_to_token_rewards(scores, microbatches_mask(microbatches))
    rows = torch.zeros(len(samples), width, device=HOST)  # filled from Python values, then moved once
    for i, (prompt, response) in enumerate(zip(samples, responses)):
        score = run.reward_fn(prompt, response)
        if isinstance(score, (int, float)):
            rows[i, len(response) - 1] = float(score)
        else:
            per_token = torch.tensor(score[:len(response)], dtype=torch.float32, device=HOST)
            rows[i, :len(per_token)] = per_token
    return rows.to(local_device())


def microbatches_mask(microbatches: list[dict]) -> torch.Tensor:
    return torch.cat([mb["response_mask"] for mb in microbatches])


def make_experience(run: RLRun, samples, responses, group_ids) -> tuple[dict, dict]:
    """The experience batch (``(S, ...)`` tensors on every rank of the replica) and its metrics."""
    from megatron.core import parallel_state

    rl, cfg = run.rl, run.cfg
    batch = build_rollout_batch(samples, responses, cfg.seq_length, rl.max_new_tokens, run.tokenizer.pad)
    microbatches = split_rows(batch, cfg.micro_batch_size)
    settings = LossSettings(run.vocab_size, rl.max_new_tokens, rl.temperature, 0, None, 0, 0, 0, "token-mean",
                            None, None, 1, 1)
    width = rl.max_new_tokens
    batch["old_logprob"] = forward_only(run.actor.model, microbatches, cfg.seq_length,
                                        lambda mb, out: response_logprobs(mb, out, settings, False)[0], width)
    batch["ref_logprob"] = forward_only(run.reference, microbatches, cfg.seq_length,
                                        lambda mb, out: response_logprobs(mb, out, settings, False)[0], width)
    mask = batch["response_mask"]
    token_rewards = task_rewards(run, samples, responses, microbatches) * mask
    scores = token_rewards.sum(-1)
    dp_group = parallel_state.get_data_parallel_group() if run.dp > 1 else None
    metrics = {}
    if rl.algo == "ppo":
        batch["values"] = forward_only(
            run.critic.model, microbatches, cfg.seq_length,
            lambda mb, out: gather_response(out[..., 0].float(), mb["starts"], width), width)
        kl_rewards, kl_metrics = core_algos.compute_kl_shaped_rewards(
            torch.zeros_like(scores), batch["old_logprob"], batch["ref_logprob"], mask, run.kl_ctl.value, "k1")
        rewards = token_rewards + kl_rewards
        config = core_algos.AdvantageConfig(gamma=rl.gamma, lam=rl.lam, whiten=True)
        advantages, returns = core_algos.get_adv_estimator("gae")(rewards, mask, config, values=batch["values"],
                                                                  dp_group=dp_group)
        batch["returns"] = returns
        metrics["critic/explained_variance"] = core_algos.explained_variance(batch["values"], returns, mask,
                                                                             group=dp_group)
        metrics["actor/kl_sum"] = kl_metrics["actor/reward_kl_sum"]
    else:
        rewards = core_algos.scores_to_token_rewards(scores, mask)  # GRPO: outcome = the row's total
        config = core_algos.AdvantageConfig(norm_by_std=rl.grpo_norm_by_std)
        advantages, _ = core_algos.get_adv_estimator("grpo")(rewards, mask, config, group_ids=group_ids)
        kl = core_algos.kl_penalty(batch["old_logprob"], batch["ref_logprob"], "k1") * mask
        metrics["actor/kl_sum"] = kl.sum(-1).mean()
    batch["advantages"] = advantages
    metrics["reward/mean"] = scores.mean()
    # Spread statistics over the whole batch (all data-parallel ranks), not a mean of per-rank ones; the means
    # above are exact as every rank holds the same number of samples.
    everyone = torch.ones_like(scores)
    metrics["reward/std"] = (core_algos.masked_var(scores, everyone, group=dp_group).sqrt()
                             if scores.numel() * run.dp > 1 else scores.new_zeros(()))
    metrics["response/length"] = mask.sum(-1).mean()
    metrics["actor/kl_coef"] = scores.new_tensor(run.kl_ctl.value)
    return batch, metrics


# --------------------------------------------------------------------------------------------------------------
# 4: PPO epochs over mini-batches
# --------------------------------------------------------------------------------------------------------------


def _global_counts(mask: torch.Tensor, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state

    counts = torch.stack(core_algos.count_tokens_and_sequences(mask)).to(torch.float64)
    if dp > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts[0].float(), counts[1].float()


def _forward_step(loss_func, data_iterator, model):
    microbatch = next(data_iterator)
    output = model(microbatch["tokens"], microbatch["position_ids"], None)
    return output, partial(loss_func, microbatch)


def _train_step(trained, microbatches: list[dict], loss_func, seq_length: int, increment: int) -> list[dict]:
    """Forward + backward over the mini-batch's micro-batches, then one optimizer and scheduler step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    trained.model.zero_grad_buffer()
    trained.optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func), data_iterator=iter(microbatches),
        model=[trained.model], num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=False,
    )
    update_successful, _, _ = trained.optimizer.step()
    if update_successful:
        trained.scheduler.step(increment=increment)
    return reduced


def _with_ptx(run: RLRun, microbatches: list[dict], position: int) -> list[dict]:
    """Append ``micro-batch-size`` pretraining rows to each micro-batch (after its experience rows)."""
    size = run.cfg.micro_batch_size
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
                                    rl.kl_coef if rl.algo == "grpo" else 0.0, rl.ptx_coef, rl.loss_agg_mode,
                                    num_tokens, num_seqs, len(microbatches), run.dp)
            actor_batches = microbatches
            if run.ptx is not None:
                position = ((run.state.iteration * rl.ppo_epochs * rl.ppo_mini_batches + step) * len(microbatches)
                            * cfg.micro_batch_size * run.dp)
                actor_batches = _with_ptx(run, microbatches, position)
            reduced = _train_step(run.actor, actor_batches, partial(actor_loss, settings), cfg.seq_length,
                                  cfg.global_batch_size)
            actor_reports.append(reduce_report(reduced, "actor", ACTOR_REPORT, TOKEN_WEIGHTED))
            if run.critic is not None:
                reduced = _train_step(run.critic, microbatches, partial(critic_loss, settings),
                                      cfg.seq_length, cfg.global_batch_size)
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
    from megatron.core import parallel_state

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
        run.first.update(prompts=samples, responses=responses, group_ids=group_ids.tolist())
    metrics.update(train_on_experience(run, batch))
    t3 = time.perf_counter()
    metrics.update({"time/generation": t1 - t0, "time/experience": t2 - t1, "time/training": t3 - t2})
    run.kl_ctl.update(metrics["actor/kl_sum"], run.cfg.global_batch_size * run.rl.n_samples_per_prompt)
    run.state.iteration += 1
    run.state.consumed_train_samples += run.cfg.global_batch_size
    return metrics


def _log(run: RLRun, step: int, metrics: dict[str, float]) -> None:
    if run.logger.writer is not None:
        for key, value in metrics.items():
            run.logger.writer.add_scalar(key, value, step)
    if step % run.cfg.log_interval == 0:
        m = metrics
        critic = (f" | vf loss {m['critic/vf_loss']:.4f} | expl var {m['critic/explained_variance']:.3f}"
                  if "critic/vf_loss" in m else "")
        run.logger.print(
            f"iteration {step:5d} | reward {m['reward/mean']:.4f} +- {m['reward/std']:.4f} | kl {m['actor/kl_sum']:.4f}"
            f" | pg loss {m['actor/pg_loss']:.4f} | clipfrac {m['actor/pg_clipfrac']:.3f} | approx kl "
            f"{m['actor/ppo_kl']:.4f} | entropy {m['actor/entropy']:.3f}{critic} | length "
            f"{m['response/length']:.1f} | time gen/exp/train {m['time/generation']:.2f}/"
            f"{m['time/experience']:.2f}/{m['time/training']:.2f} s")


def checkpoint(run: RLRun) -> None:
    from ..training.checkpointing import save_checkpoint
    from .reward_model import write_reward_marker

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
    cfg = run.cfg
    stop = cfg.train_iters if cfg.exit_interval is None else min(cfg.train_iters, cfg.exit_interval)
    while run.state.iteration < stop:
        metrics = iteration(run)
        run.history.append((run.state.iteration, metrics))
        _log(run, run.state.iteration, metrics)
        if cfg.save and cfg.save_interval and run.state.iteration % cfg.save_interval == 0 \
                and run.state.iteration < stop:
            checkpoint(run)
    if cfg.save:
        checkpoint(run)
    return run


def run(cfg: TrainConfig | dict, rl: RLConfig | dict, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, metrics)], "first": {...}}``."""
    from .ppo_setup import build_run

    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict({"mode": "finetune", **cfg})
    if isinstance(rl, dict):
        rl = RLConfig.from_dict(rl)
    rl_run = build_run(cfg, rl, quiet)
    try:
        train(rl_run)
    finally:
        rl_run.logger.close()
    return {"history": rl_run.history, "first": rl_run.first}


def main(argv=None) -> int:
    from ..errors import run_reporting_errors

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_rl_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_reporting_errors(lambda: run(config_from_args(args, "finetune"), rl_config_from_args(args)) and None)


if __name__ == "__main__":
    sys.exit(main())
