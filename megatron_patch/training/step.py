"""One training step, written once: pretraining / SFT (``training.loop``), the preference trainers
(``rlhf.preference.trainer``) and PPO / GRPO (``rlhf.ppo.loop``) all call ``optimizer_step``.

A step is megatron-core's pipeline schedule over the step's micro-batches (forward and backward through every stage;
megatron-core DDP reduces the gradients over data-parallel ranks) -> the optimizer step (gradient clipping and fp16
loss scaling happen inside megatron-core's optimizer) -> the LR scheduler advanced by the samples the step consumed
(megatron-core's scheduler counts samples). What differs between the trainers is only the forward step (which model
inputs, which loss function) and how they read the loss functions' reports; both are arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from .setup import ModelSource


@dataclass
class TrainedModel:
    """A model being trained: this rank's pipeline stage in DDP, its optimizer and LR schedule, and the model it was
    built from (its spec and tokenizer files, saved with every checkpoint)."""

    model: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    source: ModelSource


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns: the last stage's loss reports (one per micro-batch; empty on other stages),
    the gradient norm (None where the optimizer does not compute it) and whether the update was skipped (an fp16
    loss-scale overflow: the scheduler did not advance either)."""

    reports: list
    grad_norm: float | None
    skipped: bool


ForwardStep = Callable[[Iterator, torch.nn.Module], tuple]


def schedule_pass(model, forward_step: ForwardStep, data_iterator: Iterator, num_microbatches: int, seq_length: int,
                  micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's pipeline schedule (for the run's TP x PP) over ``num_microbatches`` micro-batches of
    ``model`` (one stage; a bare GPTModel for forward-only passes of frozen models); returns the last stage's loss
    reports. ``forward_only`` runs without autograd."""
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def optimizer_step(trained: TrainedModel, forward_step: ForwardStep, data_iterator: Iterator, num_microbatches: int,
                   seq_length: int, micro_batch_size: int, samples: int) -> StepResult:
    """Forward + backward over ``num_microbatches`` micro-batches, one optimizer step, and the scheduler advanced
    by ``samples`` (the step's share of ``--global-batch-size``) when the update was applied."""
    trained.model.zero_grad_buffer()
    trained.optimizer.zero_grad()
    reports = schedule_pass(trained.model, forward_step, data_iterator, num_microbatches, seq_length,
                            micro_batch_size, forward_only=False)
    update_successful, grad_norm, _ = trained.optimizer.step()
    if update_successful:
        trained.scheduler.step(increment=samples)
    return StepResult(reports, grad_norm, not update_successful)
