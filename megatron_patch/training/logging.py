"""Training logs in Megatron-LM's formats: its per-interval stdout line and its TensorBoard tag names.

Log parsers and dashboards written for Megatron-LM read both, so both are kept as Megatron-LM writes them
(megatron/training/training.py ``training_log`` and ``evaluate_and_print_results``):

    [2025-01-01 12:00:00] iteration        7/      20 | consumed samples:           56 | elapsed time per
    iteration (ms): 812.3 | learning rate: 2.000000E-05 | global batch size:     8 | lm loss: 4.123456E+00 |
    loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |

(one line). TensorBoard scalars per step: ``lm loss``, ``learning-rate``, ``batch-size``, ``loss-scale``,
``grad-norm``, each also ``... vs samples`` (x = consumed samples); per log interval ``iteration-time`` (seconds);
per evaluation ``lm loss validation`` (+ ``vs samples``, ``ppl``). Printed by global rank 0 only.
"""

from __future__ import annotations

import math
import time
from datetime import datetime

import torch.distributed as dist

LOSS_KEY = "lm loss"


def training_log_line(iteration: int, train_iters: int, consumed_samples: int, ms_per_iteration: float,
                      learning_rate: float, global_batch_size: int, loss: float | None, loss_scale: float,
                      grad_norm: float | None, skipped: int, nan: int, when: datetime | None = None,
                      extra_losses: dict[str, float] | None = None) -> str:
    """Megatron-LM's training log line (its format strings, field for field); ``extra_losses`` (a MoE model's
    ``load_balancing_loss`` ...) follow the lm loss as Megatron-LM prints its other loss-dict entries."""
    line = f" [{(when or datetime.now()).strftime('%Y-%m-%d %H:%M:%S')}]"
    line += f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {ms_per_iteration:.1f} |"
    line += f" learning rate: {learning_rate:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    if loss is not None:  # Megatron-LM leaves the loss out when every step of the interval was skipped
        line += f" {LOSS_KEY}: {loss:.6E} |"
    for name, value in (extra_losses or {}).items():
        line += f" {name}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {skipped:3d} |"
    line += f" number of nan iterations: {nan:3d} |"
    return line


def validation_log_lines(iteration: int, loss: float) -> list[str]:
    """Megatron-LM's validation block: the line framed by dashes of its length."""
    text = (f" validation loss at iteration {iteration} | {LOSS_KEY} value: {loss:.6E} | "
            f"{LOSS_KEY} PPL: {math.exp(min(20.0, loss)):.6E} | ")
    return ["-" * (len(text) + 1), text, "-" * (len(text) + 1)]


PROGRESS_SECONDS = 30.0  # the longest silence between two log lines while training


class MetricsLogger:
    """Per-interval log lines (global rank 0) and per-step TensorBoard scalars, as Megatron-LM names them."""

    def __init__(self, log_interval: int, tensorboard_dir: str | None, tokens_per_iteration: int, quiet: bool = False,
                 train_iters: int = 0, global_batch_size: int = 0):
        self.interval = log_interval
        self.tokens_per_iteration = tokens_per_iteration
        self.train_iters = train_iters
        self.global_batch_size = global_batch_size
        self.is_logger = not dist.is_initialized() or dist.get_rank() == 0
        self.quiet = quiet
        self.writer = None
        if tensorboard_dir and self.is_logger:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.start = self._last_line = time.perf_counter()
        self.consumed_samples = 0
        self._reset_window(self.start)

    def _reset_window(self, now: float) -> None:
        self._window_start = now
        self._window_iters = self._window_advanced = self._window_skipped = self._window_nan = 0
        self._window_loss = 0.0

    def print(self, message: str) -> None:
        if self.is_logger and not self.quiet:
            print(message, flush=True)

    def line_due(self, iteration: int) -> bool:
        """Whether a trainer's console line is due at ``iteration``: every ``log_interval`` steps, and sooner when
        the last line is ``PROGRESS_SECONDS`` old (a slow machine would otherwise be silent for minutes)."""
        now = time.perf_counter()
        if iteration % self.interval and now - self._last_line < PROGRESS_SECONDS:
            return False
        self._last_line = now
        return True

    def _scalar(self, tag: str, value: float, iteration: int) -> None:
        """``tag`` against the iteration and ``tag vs samples`` against the consumed samples."""
        self.writer.add_scalar(tag, value, iteration)
        self.writer.add_scalar(f"{tag} vs samples", value, self.consumed_samples)

    def log_step(self, iteration: int, loss: float, lr: float, grad_norm: float | None, skipped: bool,
                 loss_scale: float | None = None, consumed_samples: int | None = None,
                 extra_losses: dict[str, float] | None = None) -> None:
        """Record one optimizer step; print Megatron-LM's line every ``log_interval`` steps, and sooner when the
        last line is ``PROGRESS_SECONDS`` old.

        Args:
            loss_scale: the fp16 loss scale; None for bf16 / fp32, logged as 1.0 as Megatron-LM does.
            consumed_samples: samples trained on after this step (default: iteration x global batch size).
            extra_losses: other losses of this step (a MoE model's load-balancing loss), each a TensorBoard scalar
                under its name and printed with the line of the step that ends an interval.
        """
        gbs = self.global_batch_size
        self.consumed_samples = iteration * gbs if consumed_samples is None else consumed_samples
        scale = 1.0 if loss_scale is None else float(loss_scale)
        nan = not math.isfinite(loss)
        self._window_iters += 1
        self._window_skipped += int(skipped)
        self._window_nan += int(nan)
        if not skipped and not nan:
            self._window_advanced += 1
            self._window_loss += loss
        if self.writer is not None:
            self._scalar(LOSS_KEY, loss, iteration)
            self._scalar("learning-rate", lr, iteration)
            self._scalar("batch-size", gbs, iteration)
            self._scalar("loss-scale", scale, iteration)
            if grad_norm is not None:
                self._scalar("grad-norm", grad_norm, iteration)
            for name, value in (extra_losses or {}).items():
                self._scalar(name, value, iteration)
        now = time.perf_counter()
        # Every log_interval steps, and at least every PROGRESS_SECONDS on a slow machine (a long window would
        # otherwise be minutes of silence).
        if iteration % self.interval and now - self._window_start < PROGRESS_SECONDS:
            return
        seconds_per_iteration = (now - self._window_start) / self._window_iters
        if self.writer is not None:
            self.writer.add_scalar("iteration-time", seconds_per_iteration, iteration)
        mean_loss = self._window_loss / self._window_advanced if self._window_advanced else None
        self.print(training_log_line(iteration, self.train_iters, self.consumed_samples, seconds_per_iteration * 1e3,
                                     lr, gbs, mean_loss, scale, grad_norm, self._window_skipped, self._window_nan,
                                     extra_losses=extra_losses))
        self._reset_window(now)

    def expert_load(self, iteration: int, spread: dict[int, float]) -> None:
        """Per MoE layer: the busiest expert's tokens over the mean, to TensorBoard."""
        if self.writer is not None:
            for layer, value in spread.items():
                self.writer.add_scalar(f"moe/expert_load_max_over_mean_layer_{layer}", value, iteration)

    def log_eval(self, iteration: int, loss: float) -> None:
        if self.writer is not None:
            self._scalar(f"{LOSS_KEY} validation", loss, iteration)
            self.writer.add_scalar(f"{LOSS_KEY} validation ppl", math.exp(min(20.0, loss)), iteration)
        for line in validation_log_lines(iteration, loss):
            self.print(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
