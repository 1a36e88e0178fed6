"""One trainer over preference pairs (the reward model, DPO): the objective says what differs, the loop is shared.

A run: validate the flags and read the preference files (before any process group exists, so a bad line stops the
job with one line) -> initialise distributed state -> the objective builds its models (the trained stage in
megatron-core DDP with its optimizer and LR schedule, and a frozen stage if it reads one) -> resume from the last
checkpoint under ``--save``, else load ``--load`` -> train.

One step (``training.step.optimizer_step``, the step every trainer takes) = this data-parallel rank's micro-batches
of the global batch (``k`` pairs each, carried through the pipeline as ``2k`` rows: chosen, then rejected) through
the objective's forward step, forward and backward -> optimizer step -> scheduler step. Each micro-batch's loss function
reports sums over its pairs (``[metric sums..., pairs]`` under the objective's name), so the report averaged over
micro-batches and data-parallel ranks is exact. Evaluation runs the same pass, forward only, over the whole
micro-batches the validation file fills, every ``--eval-interval`` steps and at the end.

What an objective states is ``PreferenceObjective``; ``train_reward_model.RewardObjective`` and
``dpo.DPOObjective`` are the two.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch.distributed as dist
from megatron.core import parallel_state

from ...checkpoint.megatron import find_iteration_dir
from ...data.loader import MicroBatchIterator
from ...data.preference import PreferenceDataset
from ...runtime import init_distributed
from ...training.arguments import TrainConfig, add_config_arguments
from ...training.checkpointing import TrainerState, load_train_state, save_checkpoint
from ...training.entry import add_entry_arguments
from ...training.logging import MetricsLogger
from ...training.setup import check_precision_support, load_model_tokenizer, resolve_model_source
from ...training.step import TrainedModel, optimizer_step, schedule_pass
from ..roles import check_expert_parallel
from ..schedule_utils import find_resume_dir, reduce_sums


class PreferenceObjective(Protocol):
    """What a preference trainer trains and how; data, optimizer, loop, logs and checkpoints are shared.

    Attributes:
        name: "rm" | "dpo": the loss functions' report key, the loss's name in log lines, the TensorBoard prefix
            (``train/<name>_<metric>``, ``valid/<name>_<metric>``).
        metrics: the report's entries in the order the loss function stacks their sums (the pair count follows);
            "loss", "accuracy" and "margin" are among them: the log lines show those three.
        accuracy_words: what log lines call the accuracy.
        saved_words: what log lines call a saved checkpoint.
        resumed_line: the log line on resuming (format fields: iteration, resume_dir, load_dir).
        loaded_line: the log line on loading --load (format fields: what, from ``load_weights``; load_dir).
        evaluates_first: evaluate the starting weights (as iteration 0) when a run starts fresh.
        after_model_save: adds files to a checkpoint's directory before it becomes visible, or None.
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    accuracy_words: ClassVar[str]
    saved_words: ClassVar[str]
    resumed_line: ClassVar[str]
    loaded_line: ClassVar[str]
    evaluates_first: ClassVar[bool]
    after_model_save: ClassVar[Callable[[Path], None] | None]

    def check(self, cfg: TrainConfig) -> None:
        """Refuse (one line) flags this objective cannot run with; after the generic validation, before any work."""

    def build_models(self, cfg: TrainConfig, source, load_dir: Path | None, train_iters: int):
        """``(training.step.TrainedModel, frozen stage or None)``; weights of the trained stage are loaded by the trainer."""

    def load_weights(self, module, iter_dir: Path) -> str:
        """Load the trained stage (its module inside DDP) from ``iter_dir``; returns what was loaded, for the log."""

    def schedule_inputs(self, run: PreferenceRun, microbatches: list[dict]) -> tuple[Callable, Iterator]:
        """The forward-step function and data iterator of the trained model's schedule pass over ``microbatches``."""

    def history_row(self, iteration: int, report: dict[str, float]) -> tuple:
        """What ``run(...)["history"]`` records of a training step."""


@dataclass
class PreferenceRun:
    cfg: TrainConfig
    objective: PreferenceObjective
    trained: TrainedModel  # the trained stage (the reward model, DPO's policy) with its optimizer and schedule
    frozen: object | None  # the frozen stage the objective reads (DPO's reference), else None
    train_data: object
    valid_data: object | None
    train_iters: int
    logger: object
    state: object  # training.checkpointing.TrainerState: iteration and consumed samples (restored on resume)
    history: list = field(default_factory=list)  # objective.history_row of every step
    evals: list = field(default_factory=list)  # (iteration, report)

    @property
    def dp(self) -> int:
        return parallel_state.get_data_parallel_world_size()


# --- one schedule pass, one step ----------------------------------------------------------------------------------


def run_schedule(run: PreferenceRun, microbatches: list[dict], forward_only: bool) -> dict[str, float]:
    """The trained model's schedule pass over ``microbatches``; the report averaged over every pair, on every rank."""
    forward_step, data_iterator = run.objective.schedule_inputs(run, microbatches)
    reduced = schedule_pass(run.trained.model, forward_step, data_iterator, len(microbatches), run.cfg.seq_length,
                            2 * run.cfg.micro_batch_size, forward_only)
    return _report(run, reduced)


def _report(run: PreferenceRun, reduced: list) -> dict[str, float]:
    metrics = run.objective.metrics
    sums = reduce_sums(reduced, run.objective.name, len(metrics) + 1)
    pairs = float(sums[-1].clamp(min=1))
    return {metric: float(value) / pairs for metric, value in zip(metrics, sums)}


def train_step(run: PreferenceRun, microbatches: list[dict]):
    """One optimizer step over the global batch (``training.step``; a micro-batch of ``k`` pairs is ``2k`` rows);
    returns (report, grad norm or None)."""
    forward_step, data_iterator = run.objective.schedule_inputs(run, microbatches)
    result = optimizer_step(run.trained, forward_step, data_iterator, len(microbatches), run.cfg.seq_length,
                            2 * run.cfg.micro_batch_size, run.cfg.global_batch_size)
    return _report(run, result.reports), result.grad_norm


def evaluate(run: PreferenceRun) -> dict[str, float] | None:
    """The held-out report over the whole micro-batches the validation file fills; None without validation data."""
    if run.valid_data is None:
        return None
    num = max(1, len(run.valid_data) // (run.cfg.micro_batch_size * run.dp))
    iterator = MicroBatchIterator(run.valid_data, run.cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank())
    run.trained.model.eval()
    report = run_schedule(run, [next(iterator) for _ in range(num)], forward_only=True)
    run.trained.model.train()
    return report


# --- logs and checkpoints -----------------------------------------------------------------------------------------


def _metrics_text(objective: PreferenceObjective, report: dict[str, float]) -> str:
    return (f"{objective.name} loss {report['loss']:.6f} | {objective.accuracy_words} {report['accuracy']:.4f} | "
            f"margin {report['margin']:.4f}")


def _write_scalars(run: PreferenceRun, split: str, iteration: int, report: dict[str, float]) -> None:
    if run.logger.writer is not None:
        for key, value in report.items():
            run.logger.writer.add_scalar(f"{split}/{run.objective.name}_{key}", value, iteration)


def log_train_step(run: PreferenceRun, iteration: int, report: dict[str, float], grad_norm) -> None:
    """TensorBoard every step (the metrics and the LR); a console line every --log-interval steps and at least every
    30 s."""
    lr = run.trained.optimizer.param_groups[0]["lr"]
    _write_scalars(run, "train", iteration, report)
    if run.logger.writer is not None:
        run.logger.writer.add_scalar("train/learning_rate", lr, iteration)
    if run.logger.line_due(iteration):
        norm = "-" if grad_norm is None else f"{float(grad_norm):.4f}"
        run.logger.print(f"iteration {iteration:6d} | {_metrics_text(run.objective, report)} | lr {lr:.3e} | "
                         f"grad norm {norm}")


def log_eval(run: PreferenceRun, iteration: int, report: dict[str, float] | None) -> None:
    if report is None:  # no validation data
        return
    run.evals.append((iteration, report))
    _write_scalars(run, "valid", iteration, report)
    run.logger.print(f"validation at iteration {iteration:6d} | {_metrics_text(run.objective, report)}")


def checkpoint(run: PreferenceRun) -> None:
    trained = run.trained
    path = save_checkpoint(run.cfg.save, run.state.iteration, trained.model, trained.optimizer, trained.scheduler,
                           run.state, trained.source, run.cfg, after_model_save=run.objective.after_model_save)
    run.logger.print(f"saved {run.objective.saved_words} of iteration {run.state.iteration} to {path}")


# --- the loop -----------------------------------------------------------------------------------------------------


def train(run: PreferenceRun) -> PreferenceRun:
    cfg = run.cfg
    num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * run.dp)
    iterator = MicroBatchIterator(run.train_data, cfg.micro_batch_size, run.dp,
                                  parallel_state.get_data_parallel_rank(), run.state.consumed_train_samples)
    stop = run.train_iters if cfg.exit_interval is None else min(run.train_iters, cfg.exit_interval)
    if run.objective.evaluates_first and run.state.iteration == 0:
        log_eval(run, 0, evaluate(run))
    run.trained.model.train()
    while run.state.iteration < stop:
        report, grad_norm = train_step(run, [next(iterator) for _ in range(num_microbatches)])
        run.state.iteration += 1
        run.state.consumed_train_samples += cfg.global_batch_size
        iteration = run.state.iteration
        run.history.append(run.objective.history_row(iteration, report))
        log_train_step(run, iteration, report, grad_norm)
        if cfg.eval_interval and iteration % cfg.eval_interval == 0 and iteration < run.train_iters:
            log_eval(run, iteration, evaluate(run))
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < stop:
            checkpoint(run)
    if run.state.iteration >= run.train_iters:
        log_eval(run, run.train_iters, evaluate(run))
    if cfg.save:
        checkpoint(run)
    return run


# --- building a run -----------------------------------------------------------------------------------------------


PREFLIGHT_LINES = 100  # the pre-flight reads the first pairs; a bad line further down still stops the ranks


def check_run(cfg: TrainConfig, objective: PreferenceObjective, skip_bad_lines: bool, world_size: int,
              limit: int | None = None):
    """Everything checkable without a process group: flags, checkpoint, tokenizer, the preference data (its first
    ``limit`` lines for a launch's pre-flight). Returns ``(load_dir, source, train_data, valid_data)``."""
    cfg.validate(world_size)
    objective.check(cfg)
    check_expert_parallel(cfg)
    check_precision_support(cfg)
    load_dir = find_iteration_dir(cfg.load) if cfg.load else None
    source = resolve_model_source(cfg, load_dir)
    tokenizer = load_model_tokenizer(cfg, source)
    # Data first: a bad preference file stops the run before any process group or model exists.
    train_data = PreferenceDataset(cfg.train_data_path, tokenizer, cfg.seq_length, skip_bad_lines, limit)
    valid_data = (PreferenceDataset(cfg.valid_data_path, tokenizer, cfg.seq_length, skip_bad_lines, limit)
                  if cfg.valid_data_path else None)
    return load_dir, source, train_data, valid_data


def preflight(objective: PreferenceObjective, skip_bad_lines: bool) -> Callable[[TrainConfig, int], None]:
    """The ``--check`` of an entry point training ``objective`` (``training.entry.run_entry``)."""
    return lambda cfg, world_size: check_run(cfg, objective, skip_bad_lines, world_size, PREFLIGHT_LINES) and None


def build_run(cfg: TrainConfig, objective: PreferenceObjective, skip_bad_lines: bool = False,
              quiet: bool = False) -> PreferenceRun:
    """Validate, read the data, initialise distributed state, build the objective's models, resume or load. Collective."""
    load_dir, source, train_data, valid_data = check_run(cfg, objective, skip_bad_lines,
                                                         int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
                     timeout_minutes=cfg.distributed_timeout_minutes)
    train_iters = cfg.train_iters or max(1, cfg.epochs * len(train_data) // cfg.global_batch_size)
    trained, frozen = objective.build_models(cfg, source, load_dir, train_iters)
    logger = MetricsLogger(cfg.log_interval, cfg.tensorboard_dir, cfg.global_batch_size * 2 * cfg.seq_length, quiet)
    state = TrainerState()
    resume_dir = find_resume_dir(cfg.save)
    if resume_dir is not None:  # a restarted job continues where it stopped: weights, optimizer, RNG, data position
        objective.load_weights(trained.model.module, resume_dir)
        state = load_train_state(resume_dir, trained.model, trained.optimizer, trained.scheduler,
                                 not cfg.no_load_optim, not cfg.no_load_rng)
        if cfg.no_load_optim:  # no saved fp32 main copies: take them from the weights just loaded
            trained.optimizer.reload_model_params()
        logger.print(objective.resumed_line.format(iteration=state.iteration, resume_dir=resume_dir,
                                                   load_dir=load_dir))
    elif load_dir is not None:
        what = objective.load_weights(trained.model.module, load_dir)
        trained.optimizer.reload_model_params()  # weights changed under the optimizer: refresh its fp32 main copies
        logger.print(objective.loaded_line.format(what=what, load_dir=load_dir))
    if cfg.save and dist.get_rank() == 0:
        cfg.write(cfg.save)
    return PreferenceRun(cfg, objective, trained, frozen, train_data, valid_data, train_iters, logger, state)


def train_to_end(run: PreferenceRun) -> dict:
    """Train, close the logs; returns ``{"history": run.history, "evals": run.evals}``."""
    try:
        train(run)
    finally:
        run.logger.close()
    return {"history": run.history, "evals": run.evals}


def finetune_config(cfg: TrainConfig | dict) -> TrainConfig:
    """A TrainConfig as given, or built from a dict of its fields (preference files are read as finetuning data)."""
    return TrainConfig.from_dict({"mode": "finetune", **cfg}) if isinstance(cfg, dict) else cfg


def argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The training flags (``--train-data-path`` / ``--valid-data-path`` are preference jsonl files) and
    ``--skip-bad-lines``; an entry point adds its objective's flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, mode="finetune")  # preference data is read like SFT data (--train-data-path)
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed preference lines")
    add_entry_arguments(parser)
    return parser
