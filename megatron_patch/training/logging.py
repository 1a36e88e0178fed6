"""Per-interval training logs: one line to stdout (global rank 0) and TensorBoard scalars."""

from __future__ import annotations

import time

import torch.distributed as dist


class MetricsLogger:
    def __init__(self, log_interval: int, tensorboard_dir: str | None, tokens_per_iteration: int, quiet: bool = False):
        self.interval = log_interval
        self.tokens_per_iteration = tokens_per_iteration
        self.is_logger = not dist.is_initialized() or dist.get_rank() == 0
        self.quiet = quiet
        self.writer = None
        if tensorboard_dir and self.is_logger:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.start = time.perf_counter()
        self._window_start = self.start
        self._window_iters = 0
        self._window_loss = 0.0

    def print(self, message: str) -> None:
        if self.is_logger and not self.quiet:
            print(message, flush=True)

    def log_step(self, iteration: int, loss: float, lr: float, grad_norm: float | None, skipped: bool,
                 loss_scale: float | None = None) -> None:
        self._window_iters += 1
        self._window_loss += loss
        if self.writer is not None:
            self.writer.add_scalar("train/lm_loss", loss, iteration)
            self.writer.add_scalar("train/learning_rate", lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, iteration)
            if loss_scale is not None:
                self.writer.add_scalar("train/loss_scale", loss_scale, iteration)
        if iteration % self.interval:
            return
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_iteration * self._window_iters / max(now - self._window_start, 1e-9)
        if self.writer is not None:
            self.writer.add_scalar("train/tokens_per_second", tokens_per_s, iteration)
        norm = "-" if grad_norm is None else f"{grad_norm:.4f}"
        scale = "" if loss_scale is None else f" | loss scale {loss_scale:.1f}"
        self.print(
            f"iteration {iteration:6d} | lm loss {self._window_loss / self._window_iters:.6f} | lr {lr:.3e} | "
            f"grad norm {norm} | tokens/s {tokens_per_s:,.0f} | elapsed {now - self.start:8.1f}s"
            f"{' | skipped (overflow)' if skipped else ''}{scale}"
        )
        self._window_start, self._window_iters, self._window_loss = now, 0, 0.0

    def log_eval(self, iteration: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("valid/lm_loss", loss, iteration)
        self.print(f"validation at iteration {iteration:6d} | lm loss {loss:.6f}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
