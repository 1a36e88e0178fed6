"""Tally of the replayed bad-input cases (issue 13), printed at the end of the run."""

from __future__ import annotations

from collections import Counter

OUTCOMES = ("tried", "refused cleanly", "tracebacks", "hangs", "partial outputs", "code run")
TALLY: Counter = Counter()


def pytest_terminal_summary(terminalreporter):
    if TALLY["tried"]:
        counts = " / ".join(f"{name} {TALLY[name]}" for name in OUTCOMES)
        terminalreporter.write_line(f"reliability cases: {counts}")
