"""Progress of long work, readable both at a terminal and in a cluster job's log file.

At a terminal it is a tqdm bar. Where stderr is not a terminal (a job's log, ``tee``, a pipe) tqdm would either stay
silent or fill the log with carriage-return redraws; there a plain line is printed instead, at most every
``interval`` seconds and once at the end:

    hf2mcore: 120/291 tensor (41%) | 35.2 tensor/s | elapsed 0:00:03 | ETA 0:00:05

``MEGATRON_PATCH_PROGRESS_INTERVAL`` (seconds) overrides the interval of the log lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

INTERVAL_ENV = "MEGATRON_PATCH_PROGRESS_INTERVAL"
DEFAULT_LOG_INTERVAL = 30.0  # a line every 30 s keeps a multi-hour job's log short and still shows it is alive
TERMINAL_REFRESH = 0.5  # tqdm's redraw interval at a terminal


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _amount(value: float) -> str:
    """A count as an integer, a fractional amount (MB of input) with one decimal."""
    return f"{value:.1f}" if isinstance(value, float) else f"{value}"


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as whole lines for non-terminal output."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, stream: TextIO):
        self.total, self.desc, self.unit, self.interval, self.stream = total, desc, unit, interval, stream
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{_amount(self.n)}/{_amount(self.total)}" if self.total else _amount(self.n)
        parts = [f"{self.desc}: {done} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        # Under one per second the time per step reads better than "0.0 model/s" (tqdm's s/it).
        parts.append(f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return " | ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()  # the final line: the count, the rate and the time it took
        self._closed = True


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
             interval: float | None = None):
    """A progress reporter for ``total`` steps (None when unknown): use as a context manager, call ``update(n)``.

    Args:
        enabled: False gives a silent reporter (e.g. on ranks other than 0).
        stream: where to write (default: stderr); a terminal gets a tqdm bar, anything else log lines.
        interval: seconds between log lines (default: $MEGATRON_PATCH_PROGRESS_INTERVAL or 30).
    """
    if not enabled:
        return _Silent()
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=TERMINAL_REFRESH)
    if interval is None:
        interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_LOG_INTERVAL))
    return LineProgress(total, desc, unit, interval, stream)
