"""Train a reward model on preference pairs with megatron-core's pipeline schedules (any TP x PP x DP).

python -m megatron_patch.rlhf.train_reward_model --load SFT_OR_CONVERTED_CKPT --train-data-path train.jsonl \
    --valid-data-path valid.jsonl --save OUT --seq-length 64 --micro-batch-size 2 --global-batch-size 8 ...

Flags are the training flags (``training.arguments.TrainConfig``; ``--train-data-path`` / ``--valid-data-path``
are preference jsonl files) plus ``--skip-bad-lines``. One step = the schedule over the global batch's
micro-batches; a micro-batch of ``k`` pairs is ``2k`` sequences (chosen rows, then rejected rows), so the
pipeline carries both halves of every pair together. The loss is ``-logsigmoid(r_chosen - r_rejected)``, averaged
over the pairs of the global batch; evaluation reports held-out accuracy and mean margin (console + TensorBoard).
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
from .core_algos import compute_pairwise_reward_loss
from .reward_model import build_reward_model, load_reward_model_weights, sequence_rewards, write_reward_marker
from .schedule_utils import find_resume_dir, pairs_to_rows, reduce_sums


@dataclass
class RewardRun:
    cfg: TrainConfig
    model: object  # megatron-core DDP around one reward-model stage
    optimizer: object
    scheduler: object
    source: object
    train_data: object
    valid_data: object | None
    train_iters: int
    logger: object
    state: object  # training.checkpointing.TrainerState: iteration and consumed samples (restored on resume)
    history: list = field(default_factory=list)  # (iteration, loss, accuracy)
    evals: list = field(default_factory=list)  # (iteration, {"loss", "accuracy", "margin"})

    @property
    def dp(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()


def pairwise_loss_func(last_index: torch.Tensor, output: torch.Tensor):
    rewards = sequence_rewards(output, last_index)
    chosen, rejected = rewards.chunk(2)
    loss, metrics = compute_pairwise_reward_loss(chosen, rejected)
    pairs = torch.tensor(float(chosen.shape[0]), device=loss.device)
    # Sums (not means) so the report over micro-batches and data-parallel ranks is exact.
    report = torch.stack([loss.detach() * pairs, metrics["rm/accuracy"] * pairs, metrics["rm/margin"] * pairs, pairs])
    return loss, {"rm": report}


def forward_step(data_iterator, model):
    device = next(model.parameters()).device
    rows = pairs_to_rows(next(data_iterator), device)
    output = model(rows["tokens"], rows["position_ids"], None)
    return output, partial(pairwise_loss_func, rows["last_index"])


def reduce_report(reduced: list[dict]) -> dict[str, float]:
    """Mean loss, accuracy and margin over every pair of the schedule run, on every rank."""
    sums = reduce_sums(reduced, "rm", 4)
    pairs = float(sums[3].clamp(min=1))
    return {"loss": float(sums[0]) / pairs, "accuracy": float(sums[1]) / pairs, "margin": float(sums[2]) / pairs}


def run_schedule(run: RewardRun, iterator, num_microbatches: int, forward_only: bool) -> dict[str, float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=[run.model],
        num_microbatches=num_microbatches, seq_length=run.cfg.seq_length,
        micro_batch_size=2 * run.cfg.micro_batch_size, forward_only=forward_only,
    )
    return reduce_report(reduced)


def evaluate(run: RewardRun) -> dict[str, float] | None:
    """Held-out loss / accuracy / margin over the whole micro-batches the validation file fills."""
    if run.valid_data is None:
        return None
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    per_microbatch = run.cfg.micro_batch_size * run.dp
    num = max(1, len(run.valid_data) // per_microbatch)
    iterator = MicroBatchIterator(run.valid_data, run.cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank())
    run.model.eval()
    with torch.no_grad():
        report = run_schedule(run, iterator, num, forward_only=True)
    run.model.train()
    return report


def log_eval(run: RewardRun, iteration: int, report: dict[str, float]) -> None:
    run.evals.append((iteration, report))
    if run.logger.writer is not None:
        for key, value in report.items():
            run.logger.writer.add_scalar(f"valid/rm_{key}", value, iteration)
    run.logger.print(f"validation at iteration {iteration:6d} | rm loss {report['loss']:.6f} | "
                     f"accuracy {report['accuracy']:.4f} | margin {report['margin']:.4f}")


def checkpoint(run: RewardRun) -> None:
    from ..training.checkpointing import save_checkpoint

    path = save_checkpoint(run.cfg.save, run.state.iteration, run.model, run.optimizer, run.scheduler, run.state,
                           run.source, run.cfg, after_model_save=write_reward_marker)
    run.logger.print(f"saved reward model of iteration {run.state.iteration} to {path}")


def train(run: RewardRun) -> RewardRun:
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    cfg = run.cfg
    num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * run.dp)
    iterator = MicroBatchIterator(run.train_data, cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank(), run.state.consumed_train_samples)
    stop = run.train_iters if cfg.exit_interval is None else min(run.train_iters, cfg.exit_interval)
    run.model.train()
    while run.state.iteration < stop:
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        report = run_schedule(run, iterator, num_microbatches, forward_only=False)
        update_successful, grad_norm, _ = run.optimizer.step()
        if update_successful:
            run.scheduler.step(increment=cfg.global_batch_size)
        run.state.iteration += 1
        run.state.consumed_train_samples += cfg.global_batch_size
        iteration = run.state.iteration
        run.history.append((iteration, report["loss"], report["accuracy"]))
        lr = run.optimizer.param_groups[0]["lr"]
        if run.logger.writer is not None:
            for key, value in report.items():
                run.logger.writer.add_scalar(f"train/rm_{key}", value, iteration)
            run.logger.writer.add_scalar("train/learning_rate", lr, iteration)
        if iteration % cfg.log_interval == 0:
            norm = "-" if grad_norm is None else f"{float(grad_norm):.4f}"
            run.logger.print(f"iteration {iteration:6d} | rm loss {report['loss']:.6f} | accuracy "
                             f"{report['accuracy']:.4f} | margin {report['margin']:.4f} | lr {lr:.3e} | "
                             f"grad norm {norm}")
        if cfg.eval_interval and iteration % cfg.eval_interval == 0 and iteration < run.train_iters:
            log_eval(run, iteration, evaluate(run))
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < stop:
            checkpoint(run)
    if run.state.iteration >= run.train_iters:
        final = evaluate(run)
        if final is not None:
            log_eval(run, run.train_iters, final)
    if cfg.save:
        checkpoint(run)
    return run


def build_run(cfg: TrainConfig, skip_bad_lines: bool = False, quiet: bool = False) -> RewardRun:
    """Validate, initialise distributed state, build the reward model, optimizer and data; load --load. Collective."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from ..checkpoint.megatron import find_iteration_dir
    from ..data.preference import PreferenceDataset
    from ..data.tokenizers import load_tokenizer
    from ..runtime import init_distributed
    from ..training.checkpointing import TrainerState, load_train_state
    from ..training.logging import MetricsLogger
    from ..training.setup import (
        build_optimizer,
        build_scheduler,
        build_transformer_config,
        check_precision_support,
        resolve_model_source,
    )

    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    check_precision_support(cfg)
    load_dir = find_iteration_dir(cfg.load) if cfg.load else None
    source = resolve_model_source(cfg, load_dir)
    source.arch.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    tokenizer_path = cfg.tokenizer_model or source.assets_dir
    if tokenizer_path is None:
        raise ConfigError("no tokenizer: pass --tokenizer-model (the checkpoint has no hf_assets)")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > source.spec.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {source.spec.vocab_size}")
    # Data first: a bad preference file stops the run before any process group or model exists.
    train_data = PreferenceDataset(cfg.train_data_path, tokenizer, cfg.seq_length, skip_bad_lines)
    valid_data = (PreferenceDataset(cfg.valid_data_path, tokenizer, cfg.seq_length, skip_bad_lines)
                  if cfg.valid_data_path else None)

    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed)
    config = build_transformer_config(cfg, source)
    module = build_reward_model(source.arch, source.spec.padded_vocab_size, config, cfg.transformer_impl, cfg.seed)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer,
                                               check_for_nan_in_grad=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    optimizer = build_optimizer(cfg, model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    train_iters = cfg.train_iters or max(1, cfg.epochs * len(train_data) // cfg.global_batch_size)
    scheduler = build_scheduler(cfg, optimizer, train_iters)
    logger = MetricsLogger(cfg.log_interval, cfg.tensorboard_dir, cfg.global_batch_size * 2 * cfg.seq_length, quiet)
    state = TrainerState()
    resume_dir = find_resume_dir(cfg.save)
    if resume_dir is not None:  # a restarted job continues where it stopped: weights, optimizer, RNG, data position
        load_reward_model_weights(module, resume_dir)
        state = load_train_state(resume_dir, model, optimizer, scheduler, not cfg.no_load_optim, not cfg.no_load_rng)
        logger.print(f"resumed at iteration {state.iteration} from {resume_dir}")
    elif load_dir is not None:
        with_head = load_reward_model_weights(module, load_dir)
        optimizer.reload_model_params()
        logger.print(f"loaded {'the reward model' if with_head else 'the backbone (new reward head)'} from {load_dir}")
    if cfg.save and dist.get_rank() == 0:
        cfg.write(cfg.save)
    return RewardRun(cfg, model, optimizer, scheduler, source, train_data, valid_data, train_iters, logger, state)


def run(cfg: TrainConfig | dict, skip_bad_lines: bool = False, quiet: bool = False) -> dict:
    """Build and train; returns ``{"history": [(iteration, loss, accuracy)], "evals": [(iteration, report)]}``."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict({"mode": "finetune", **cfg})
    reward_run = build_run(cfg, skip_bad_lines, quiet)
    try:
        train(reward_run)
    finally:
        reward_run.logger.close()
    return {"history": reward_run.history, "evals": reward_run.evals}


def main(argv=None) -> int:
    from ..errors import run_reporting_errors

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.train_reward_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, mode="finetune")  # preference data is read like SFT data (--train-data-path)
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed preference lines")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: run(config_from_args(args, "finetune"), args.skip_bad_lines) and None)


if __name__ == "__main__":
    sys.exit(main())
