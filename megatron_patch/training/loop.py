"""The training loop: build everything from a TrainConfig, then ``train_step`` until --train-iters.

One step is ``training.step.optimizer_step`` (the step PPO / GRPO and the preference trainers take too) over the
global batch's micro-batches, with the LM loss below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.megatron import TRACKER, find_iteration_dir
from ..checkpoint.trusted_load import check_torch_dist_checkpoint
from ..errors import ConfigError
from ..runtime.device import local_device, to_device
from .arguments import TrainConfig
from .checkpointing import (
    TRAIN_STATE,
    TrainerState,
    has_train_state,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from .logging import MetricsLogger
from .moe_metrics import ExpertLoad, step_moe_losses
from .setup import (
    attach_schedule_hooks,
    build_ddp_model,
    build_optimizer,
    build_scheduler,
    build_transformer_config,
    check_precision_support,
    check_resumed_schedule,
    load_model_tokenizer,
    resolve_model_source,
)
from .signals import StopSignals, report_interrupted, terminated_line
from .step import TrainedModel, optimizer_step, schedule_pass


@dataclass
class Trainer:
    cfg: TrainConfig
    trained: TrainedModel
    state: TrainerState
    train_data: object
    valid_data: object | None
    train_iters: int
    seq_length: int
    logger: MetricsLogger
    history: list = field(default_factory=list)  # (iteration, loss) of every step
    signals: StopSignals | None = None  # SIGTERM / Ctrl-C, while run() trains
    last_saved: tuple[int, str] | None = None  # (iteration, --save) of this run's newest checkpoint
    moe_history: list = field(default_factory=list)  # {MoE loss: value} of every step (empty for a dense model)
    expert_load: ExpertLoad | None = None  # a MoE model's tokens per expert, counted during each step

    @property
    def num_microbatches(self) -> int:
        from megatron.core import parallel_state

        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * parallel_state.get_data_parallel_world_size())


# --- one step ------------------------------------------------------------------------------------------------------


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(loss sum, token count, {"lm loss": (sum, count)}) over the micro-batch's unmasked tokens.

    megatron-core's schedule divides the sum by the count and by the number of micro-batches (Megatron-LM's
    default: the gradient of the mean of micro-batch means), or, with ``--calculate-per-token-loss``, leaves the
    sum and divides every gradient by the global batch's token count once they are reduced (the token mean over
    the whole global batch). The (sum, count) pair gives the logged token-weighted loss either way.
    """
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return total, count.detach().int(), {"lm loss": torch.stack([total.detach(), count])}


def forward_step(data_iterator, model):
    batch = to_device(next(data_iterator))  # once, at the top of the step: the model and the loss live there
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_loss, batch["loss_mask"])


def reduce_loss(reduced: list[dict]) -> float:
    """Token-weighted mean loss of the global batch, on every rank (it lives on the last pipeline stage)."""
    from megatron.core import parallel_state

    # On the device: NCCL reduces only device tensors, and the micro-batch losses live there.
    pair = torch.zeros(2, dtype=torch.float64, device=local_device())
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            pair += item["lm loss"].double()
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(pair, group=parallel_state.get_pipeline_model_parallel_group())
    return float(pair[0] / pair[1].clamp(min=1.0))


def train_step(t: Trainer, data_iterator) -> tuple[float, float | None, bool]:
    """One optimizer step over the global batch: (its loss, grad norm, skipped)."""
    result = optimizer_step(t.trained, forward_step, data_iterator, t.num_microbatches, t.seq_length,
                            t.cfg.micro_batch_size, t.cfg.global_batch_size)
    return reduce_loss(result.reports), result.grad_norm, result.skipped


def evaluate(t: Trainer) -> float | None:
    if t.valid_data is None:
        return None
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    dp = parallel_state.get_data_parallel_world_size()
    per_microbatch = t.cfg.micro_batch_size * dp
    if t.cfg.mode == "finetune":  # the whole validation file
        num = max(1, -(-len(t.valid_data) // per_microbatch))
    else:
        num = t.cfg.eval_iters * t.num_microbatches
    iterator = MicroBatchIterator(t.valid_data, t.cfg.micro_batch_size, dp, parallel_state.get_data_parallel_rank())
    model = t.trained.model
    model.eval()
    loss = reduce_loss(schedule_pass(model, forward_step, iterator, num, t.seq_length, t.cfg.micro_batch_size,
                                     forward_only=True))
    model.train()
    return loss


# --- the loop -----------------------------------------------------------------------------------------------------


def train(t: Trainer) -> list[tuple[int, float]]:
    from megatron.core import parallel_state

    from ..data.loader import MicroBatchIterator

    cfg = t.cfg
    if t.state.iteration >= t.train_iters:
        t.logger.print(f"nothing to train: the checkpoint is at iteration {t.state.iteration} and --train-iters is "
                       f"{t.train_iters} (this run is finished; to train further pass a larger --train-iters with "
                       "--override-opt_param-scheduler)")
        return t.history
    iterator = MicroBatchIterator(t.train_data, cfg.micro_batch_size, parallel_state.get_data_parallel_world_size(),
                                  parallel_state.get_data_parallel_rank(), t.state.consumed_train_samples)
    stop = t.train_iters if cfg.exit_interval is None else min(t.train_iters, cfg.exit_interval)
    t.trained.model.train()
    while t.state.iteration < stop:
        if t.expert_load is not None:
            t.expert_load.reset()  # count this step's routing only (not evaluation's)
        loss, grad_norm, skipped = train_step(t, iterator)
        t.state.iteration += 1
        t.state.consumed_train_samples += cfg.global_batch_size
        t.history.append((t.state.iteration, loss))
        moe_losses = step_moe_losses(cfg, t.trained.source.arch, t.num_microbatches, t.state.iteration)
        if t.expert_load is not None:
            spread = t.expert_load.spread()
            moe_losses[ExpertLoad.TAG] = max(spread.values())
            t.logger.expert_load(t.state.iteration, spread)
        t.moe_history.append(moe_losses)
        scale = t.trained.optimizer.get_loss_scale().item() if cfg.fp16 else None
        t.logger.log_step(t.state.iteration, loss, t.trained.optimizer.param_groups[0]["lr"],
                          None if grad_norm is None else float(grad_norm), skipped, scale,
                          consumed_samples=t.state.consumed_train_samples, extra_losses=moe_losses)
        if cfg.eval_interval and t.state.iteration % cfg.eval_interval == 0:
            t.logger.log_eval(t.state.iteration, evaluate(t))
        if cfg.save and cfg.save_interval and t.state.iteration % cfg.save_interval == 0:
            checkpoint(t)
        if t.signals is not None and t.signals.terminate_requested():  # every rank, at the same point
            saved = t.last_saved is not None and t.last_saved[0] == t.state.iteration
            path = (checkpoint(t) if not saved else find_iteration_dir(cfg.save)) if cfg.save else None
            t.logger.print(terminated_line(t.state.iteration, cfg.save, path))
            return t.history
    finished = t.state.iteration >= t.train_iters
    if finished and t.valid_data is not None and not (cfg.eval_interval and t.state.iteration % cfg.eval_interval == 0):
        t.logger.log_eval(t.state.iteration, evaluate(t))  # the validation loss of the final weights
    if cfg.save and (not cfg.save_interval or t.state.iteration % cfg.save_interval):
        checkpoint(t)
    return t.history


def checkpoint(t: Trainer) -> Path:
    trained = t.trained
    path = save_checkpoint(t.cfg.save, t.state.iteration, trained.model, trained.optimizer, trained.scheduler, t.state,
                           trained.source, t.cfg)
    t.last_saved = (t.state.iteration, str(t.cfg.save))
    t.logger.print(f"saved checkpoint of iteration {t.state.iteration} to {path}")
    return path


# --- building a run -----------------------------------------------------------------------------------------------


def _load_dirs(cfg: TrainConfig) -> tuple[Path | None, bool]:
    """(checkpoint to load, resume its training state?). A --save directory that already holds a checkpoint of
    this run wins over --load: a restarted job continues where it stopped. --load of a checkpoint with training
    state resumes it when pretraining (Megatron-LM's behaviour), and gives weights only to --finetune / finetuning."""
    if cfg.save and (Path(cfg.save) / TRACKER).is_file():
        return find_iteration_dir(cfg.save), not cfg.finetune
    if cfg.load is None:
        return None, False
    load_dir = find_iteration_dir(cfg.load)
    # Finetuning starts from the weights of whatever --load holds; pretraining continues a run's state.
    return load_dir, has_train_state(load_dir) and not cfg.finetune and cfg.mode == "pretrain"


def build_trainer(cfg: TrainConfig, quiet: bool = False) -> Trainer:
    """Validate, initialise distributed state, build model/optimizer/data, load a checkpoint. Collective."""
    from ..runtime import init_distributed

    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    check_precision_support(cfg)
    load_dir, resume = _load_dirs(cfg)
    source = resolve_model_source(cfg, load_dir)
    tokenizer = load_model_tokenizer(cfg, source)

    init_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed,
                     timeout_minutes=cfg.distributed_timeout_minutes,
                     expert_model_parallel_size=cfg.expert_model_parallel_size)
    config = build_transformer_config(cfg, source)
    model = build_ddp_model(cfg, source, config)
    optimizer = build_optimizer(cfg, model)
    attach_schedule_hooks(config, model, optimizer)

    train_data, valid_data, seq_length, train_iters = build_data(cfg, tokenizer)
    scheduler = build_scheduler(cfg, optimizer, train_iters)
    state = TrainerState()
    if load_dir is not None:
        load_weights(model, load_dir)
        if resume and not cfg.no_load_optim:
            check_resumed_schedule(cfg, saved_scheduler_state(load_dir), scheduler)
        if resume:
            state = load_train_state(load_dir, model, optimizer, scheduler, not cfg.no_load_optim, not cfg.no_load_rng)
        # Weights changed under the optimizer: refresh its fp32 main copies (bf16/fp16 runs).
        if not resume or cfg.no_load_optim:
            optimizer.reload_model_params()
    logger = MetricsLogger(cfg.log_interval, cfg.tensorboard_dir, cfg.global_batch_size * seq_length, quiet=quiet,
                           train_iters=train_iters, global_batch_size=cfg.global_batch_size)
    if load_dir is not None:
        what = f"resumed at iteration {state.iteration}" if resume else "loaded weights (iteration restarted at 0)"
        logger.print(f"{what} from {load_dir}")
    if cfg.save and dist.get_rank() == 0:
        cfg.write(cfg.save)
    expert_load = ExpertLoad(model, source.arch, local_device()) if source.arch.is_moe else None
    trainer = Trainer(cfg, TrainedModel(model, optimizer, scheduler, source), state, train_data, valid_data,
                      train_iters, seq_length, logger, expert_load=expert_load)
    if resume and cfg.save and Path(load_dir).parent == Path(cfg.save):
        trainer.last_saved = (state.iteration, str(cfg.save))
    return trainer


def saved_scheduler_state(iter_dir: Path) -> dict:
    """The LR scheduler's state in a training checkpoint (its common.pt: no tensors read)."""
    from megatron.core import dist_checkpointing

    state_dir = Path(iter_dir) / TRAIN_STATE
    check_torch_dist_checkpoint(state_dir)  # megatron-core unpickles without restriction
    return dist_checkpointing.load_common_state_dict(str(state_dir)).get("opt_param_scheduler", {})


def build_data(cfg: TrainConfig, tokenizer):
    """(train dataset, valid dataset or None, sequence length of a sample, train iterations)."""
    if cfg.mode == "finetune":
        from ..data.sft import SFTDataset

        length = cfg.max_padding_length or cfg.seq_length
        train_data = SFTDataset(cfg.train_data_path, tokenizer, length, packing=cfg.sft_packing)
        valid_data = (SFTDataset(cfg.valid_data_path, tokenizer, length, packing=cfg.sft_packing)
                      if cfg.valid_data_path else None)
        train_iters = cfg.train_iters or max(1, cfg.epochs * len(train_data) // cfg.global_batch_size)
        return train_data, valid_data, length, train_iters

    from ..data.gpt import build_gpt_datasets

    train_samples = cfg.train_iters * cfg.global_batch_size
    # Validation data reserved by --split is evaluated every --eval-interval and after the last iteration (as
    # Megatron-LM does), also without --eval-interval.
    weights = cfg.split.replace("/", ",").split(",")
    try:
        reserves_validation = len(weights) > 1 and float(weights[1]) > 0
    except ValueError:
        raise ConfigError(f"--split must be train,valid,test weights such as 98,2,0 (got {cfg.split})") from None
    eval_runs = ((cfg.train_iters // cfg.eval_interval if cfg.eval_interval else 0) + 1) if reserves_validation else 0
    valid_samples = eval_runs * cfg.eval_iters * cfg.global_batch_size
    # Beside the checkpoint directory, never inside it (it is not part of a checkpoint); GPTDataset keys its files
    # by a hash of the dataset's settings, so runs may share it.
    cache = cfg.data_cache_path or (str(Path(cfg.save).resolve().parent / "data_cache") if cfg.save else None)
    train_data, valid_data, _ = build_gpt_datasets(
        cfg.data_path, cfg.split, cfg.seq_length, cfg.seed, tokenizer.eod, tokenizer.vocab_size,
        (train_samples, valid_samples, 0), cache)
    if train_data is None:
        raise ConfigError(f"--split {cfg.split} leaves no training data")
    return train_data, valid_data if valid_samples else None, cfg.seq_length, cfg.train_iters


def run(cfg: TrainConfig | dict, quiet: bool = False) -> list[tuple[int, float]]:
    """Build and train; returns [(iteration, loss)] for the steps this process ran.

    SIGTERM stops after the current iteration with a checkpoint (exit 0); Ctrl-C stops at once with one line and
    SystemExit(130) (training/signals.py).
    """
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    trainer = None
    with StopSignals() as signals:
        try:
            trainer = build_trainer(cfg, quiet=quiet)
            trainer.signals = signals
            return train(trainer)
        except (KeyboardInterrupt, Exception):  # SystemExit and GeneratorExit pass through untouched
            if not signals.interrupted:
                raise
            # Whatever Ctrl-C interrupted (a collective whose peer already stopped included): one line, no traceback.
            report_interrupted(None if trainer is None else trainer.state.iteration,
                               None if trainer is None else trainer.last_saved)
        finally:
            if trainer is not None:
                trainer.logger.close()
