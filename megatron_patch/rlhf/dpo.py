"""DPO on megatron-core: a trained policy and a frozen reference, both GPTModels at the run's TP x PP.

python -m megatron_patch.rlhf.dpo --load SFT_CKPT --train-data-path train.jsonl --valid-data-path valid.jsonl \
    --save OUT --seq-length 64 --micro-batch-size 2 --global-batch-size 8 --lr 1e-6 --dpo-beta 0.1

One step:
  1. this data-parallel rank's micro-batches of the global batch are read once;
  2. the reference runs over them through the pipeline schedule, forward only, and the last stage keeps each
     pair's summed response log-probs (``(k,)`` chosen, ``(k,)`` rejected per micro-batch): computed once per batch;
  3. the policy runs forward and backward over the same micro-batches; each micro-batch's loss function receives
     its reference log-probs and returns ``compute_dpo_loss``; megatron-core DDP reduces the gradients.
The reference has no optimizer and no gradient buffers. Log-probs come from the vocab-parallel logits
(``rlhf.logprobs``) over the real vocabulary (padding rows excluded), so no rank gathers the vocabulary.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..training.arguments import TrainConfig, add_config_arguments, config_from_args
from .core_algos import compute_dpo_loss, masked_sum
from .logprobs import vocab_parallel_logprobs
from .schedule_utils import find_resume_dir, pairs_to_rows, reduce_sums

REPORT = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")


@dataclass
class DPORun:
    cfg: TrainConfig
    beta: float
    policy: object  # megatron-core DDP around one policy stage
    reference: object  # a GPTModel stage, frozen
    optimizer: object
    scheduler: object
    source: object
    train_data: object
    valid_data: object | None
    train_iters: int
    logger: object
    state: object  # training.checkpointing.TrainerState: iteration and consumed samples (restored on resume)
    history: list = field(default_factory=list)  # (iteration, report)
    evals: list = field(default_factory=list)  # (iteration, report)

    @property
    def dp(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()


def sequence_logps(rows: dict[str, torch.Tensor], vocab_size: int, logits: torch.Tensor) -> torch.Tensor:
    """``(2k,)`` summed log-probs of each row's response tokens, from ``(2k, seq, vocab / tp)`` logits."""
    from megatron.core import parallel_state

    token_logps = vocab_parallel_logprobs(logits, rows["labels"], parallel_state.get_tensor_model_parallel_group(),
                                          vocab_size)
    return masked_sum(token_logps, rows["loss_mask"], dim=-1)


def _reference_loss_func(rows, vocab_size, logits):
    logps = sequence_logps(rows, vocab_size, logits)
    return logps.sum() * 0.0, {"logps": logps.detach()}


def _reference_forward_step(vocab_size, data_iterator, model):
    rows = pairs_to_rows(next(data_iterator), next(model.parameters()).device)
    logits = model(rows["tokens"], rows["position_ids"], None)
    return logits, partial(_reference_loss_func, rows, vocab_size)


def _dpo_loss_func(rows, vocab_size, beta, reference_logps, logits):
    policy_chosen, policy_rejected = sequence_logps(rows, vocab_size, logits).chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    loss, metrics = compute_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    pairs = torch.tensor(float(policy_chosen.shape[0]), device=loss.device)
    keys = ("dpo/reward_accuracy", "dpo/reward_margin", "dpo/rewards_chosen", "dpo/rewards_rejected")
    report = torch.stack([loss.detach() * pairs, *(metrics[k] * pairs for k in keys), pairs])
    return loss, {"dpo": report}


def _policy_forward_step(vocab_size, beta, data_iterator, model):
    batch, reference_logps = next(data_iterator)  # reference_logps is None off the last pipeline stage
    rows = pairs_to_rows(batch, next(model.parameters()).device)
    logits = model(rows["tokens"], rows["position_ids"], None)
    return logits, partial(_dpo_loss_func, rows, vocab_size, beta, reference_logps)


def _schedule(model, step_func, iterator, num_microbatches: int, cfg: TrainConfig, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iterator, model=[model], num_microbatches=num_microbatches,
        seq_length=cfg.seq_length, micro_batch_size=2 * cfg.micro_batch_size, forward_only=forward_only,
    )


def dpo_schedule(run: DPORun, microbatches: list[dict], forward_only: bool) -> dict[str, float]:
    """Reference pass, then the policy pass over the same micro-batches; the report averaged over all pairs."""
    from megatron.core import parallel_state

    vocab_size = run.source.spec.vocab_size
    with torch.no_grad():
        reference_out = _schedule(run.reference, partial(_reference_forward_step, vocab_size), iter(microbatches),
                                  len(microbatches), run.cfg, forward_only=True)
    last_stage = parallel_state.is_pipeline_last_stage()
    reference_logps = [out["logps"] for out in reference_out] if last_stage else [None] * len(microbatches)
    paired = iter(list(zip(microbatches, reference_logps)))
    step = partial(_policy_forward_step, vocab_size, run.beta)
    if forward_only:
        with torch.no_grad():
            reduced = _schedule(run.policy, step, paired, len(microbatches), run.cfg, True)
    else:
        reduced = _schedule(run.policy, step, paired, len(microbatches), run.cfg, False)
    sums = reduce_sums(reduced, "dpo", len(REPORT) + 1)
    pairs = float(sums[-1].clamp(min=1))
    return {name: float(value) / pairs for name, value in zip(REPORT, sums[:-1])}


def _microbatches(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def evaluate(run: DPORun) -> dict[str, float] | None:
    if run.valid_data is None:
        return None
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    num = max(1, len(run.valid_data) // (run.cfg.micro_batch_size * run.dp))
    iterator = MicroBatchIterator(run.valid_data, run.cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank())
    run.policy.eval()
    report = dpo_schedule(run, _microbatches(iterator, num), forward_only=True)
    run.policy.train()
    return report


def _log(run: DPORun, prefix: str, iteration: int, report: dict[str, float]) -> None:
    if run.logger.writer is not None:
        for key, value in report.items():
            run.logger.writer.add_scalar(f"{prefix}/dpo_{key}", value, iteration)
    run.logger.print(f"{'validation at ' if prefix == 'valid' else ''}iteration {iteration:6d} | dpo loss "
                     f"{report['loss']:.6f} | reward accuracy {report['accuracy']:.4f} | margin {report['margin']:.4f}")


def checkpoint(run: DPORun) -> None:
    from ..training.checkpointing import save_checkpoint

    path = save_checkpoint(run.cfg.save, run.state.iteration, run.policy, run.optimizer, run.scheduler, run.state,
                           run.source, run.cfg)
    run.logger.print(f"saved the DPO policy of iteration {run.state.iteration} to {path}")


def train(run: DPORun) -> DPORun:
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    cfg = run.cfg
    num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * run.dp)
    iterator = MicroBatchIterator(run.train_data, cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank(), run.state.consumed_train_samples)
    stop = run.train_iters if cfg.exit_interval is None else min(run.train_iters, cfg.exit_interval)
    if run.state.iteration == 0:
        initial = evaluate(run)
        if initial is not None:
            run.evals.append((0, initial))
            _log(run, "valid", 0, initial)
    run.policy.train()
    while run.state.iteration < stop:
        run.policy.zero_grad_buffer()
        run.optimizer.zero_grad()
        report = dpo_schedule(run, _microbatches(iterator, num_microbatches), forward_only=False)
        update_successful, _, _ = run.optimizer.step()
        if update_successful:
            run.scheduler.step(increment=cfg.global_batch_size)
        run.state.iteration += 1
        run.state.consumed_train_samples += cfg.global_batch_size
        iteration = run.state.iteration
        run.history.append((iteration, report))
        if iteration % cfg.log_interval == 0:
            _log(run, "train", iteration, report)
        if cfg.eval_interval and iteration % cfg.eval_interval == 0 and iteration < run.train_iters:
            run.evals.append((iteration, evaluate(run)))
            _log(run, "valid", iteration, run.evals[-1][1])
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < stop:
            checkpoint(run)
    if run.state.iteration >= run.train_iters:
        final = evaluate(run)
        if final is not None:
            run.evals.append((run.train_iters, final))
            _log(run, "valid", run.train_iters, final)
    if cfg.save:
        checkpoint(run)
    return run


def build_run(cfg: TrainConfig, beta: float, skip_bad_lines: bool = False, quiet: bool = False) -> DPORun:
    """Validate, initialise distributed state, build policy (DDP + optimizer) and frozen reference from --load."""
    from megatron.core.distributed import finalize_model_grads

    from ..checkpoint.megatron import find_iteration_dir
    from ..data.preference import PreferenceDataset
    from ..data.tokenizers import load_tokenizer
    from ..models.builder import build_model
    from ..models.checkpoint import Checkpoint
    from ..runtime import init_distributed
    from ..training.checkpointing import TrainerState, load_train_state
    from ..training.logging import MetricsLogger
    from ..training.setup import (
        build_ddp_model,
        build_optimizer,
        build_scheduler,
        build_transformer_config,
        check_precision_support,
        resolve_model_source,
    )

    if beta <= 0:
        raise ConfigError(f"--dpo-beta must be > 0 (got {beta})")
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.load is None:
        raise ConfigError("DPO needs --load: the SFT (or converted) checkpoint both the policy and the reference "
                          "start from")
    check_precision_support(cfg)
    load_dir = find_iteration_dir(cfg.load)
    source = resolve_model_source(cfg, load_dir)
    source.arch.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    tokenizer = load_tokenizer(cfg.tokenizer_model or source.assets_dir)
    train_data = PreferenceDataset(cfg.train_data_path, tokenizer, cfg.seq_length, skip_bad_lines)
    valid_data = (PreferenceDataset(cfg.valid_data_path, tokenizer, cfg.seq_length, skip_bad_lines)
                  if cfg.valid_data_path else None)

    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed)
    config = build_transformer_config(cfg, source)
    policy = build_ddp_model(cfg, source, config)
    optimizer = build_optimizer(cfg, policy)
    config.no_sync_func = policy.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    # The reference gets its own config: no DDP hooks, no loss scaling, nothing of the policy's.
    reference = build_model(source.arch, source.spec.padded_vocab_size,
                            config=build_transformer_config(cfg, source), transformer_impl=cfg.transformer_impl)
    source.checkpoint.load_into(reference)
    reference.eval()
    reference.requires_grad_(False)
    train_iters = cfg.train_iters or max(1, cfg.epochs * len(train_data) // cfg.global_batch_size)
    scheduler = build_scheduler(cfg, optimizer, train_iters)
    logger = MetricsLogger(cfg.log_interval, cfg.tensorboard_dir, cfg.global_batch_size * 2 * cfg.seq_length, quiet)
    state = TrainerState()
    resume_dir = find_resume_dir(cfg.save)
    if resume_dir is not None:  # a restarted job continues where it stopped; the reference stays --load
        Checkpoint.open(resume_dir).load_into(policy.module)
        state = load_train_state(resume_dir, policy, optimizer, scheduler, not cfg.no_load_optim, not cfg.no_load_rng)
        logger.print(f"resumed the policy at iteration {state.iteration} from {resume_dir}; reference from {load_dir}")
    else:
        source.checkpoint.load_into(policy.module)
        optimizer.reload_model_params()
        logger.print(f"policy and reference loaded from {load_dir}")
    if cfg.save and dist.get_rank() == 0:
        cfg.write(cfg.save)
    return DPORun(cfg, beta, policy, reference, optimizer, scheduler, source, train_data, valid_data, train_iters,
                  logger, state)


def run(cfg: TrainConfig | dict, beta: float = 0.1, skip_bad_lines: bool = False, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, report)], "evals": [(iteration, report)]}``."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict({"mode": "finetune", **cfg})
    dpo_run = build_run(cfg, beta, skip_bad_lines, quiet)
    try:
        train(dpo_run)
    finally:
        dpo_run.logger.close()
    return {"history": dpo_run.history, "evals": dpo_run.evals}


def main(argv=None) -> int:
    from ..errors import run_reporting_errors

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, mode="finetune")  # preference data is read like SFT data (--train-data-path)
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (> 0) (default: 0.1)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed preference lines")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: run(config_from_args(args, "finetune"), args.dpo_beta, args.skip_bad_lines) and None)


if __name__ == "__main__":
    sys.exit(main())
