"""Training logs as Megatron-LM writes them: its stdout line (parsed with a log-parser regex) and TB tag names."""

from __future__ import annotations

import math
import re

# What Megatron-LM log parsers match (one named group per field of training.py's training_log).
MEGATRON_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration\s+(?P<iteration>\d+)/\s*(?P<train_iters>\d+) \|"
    r" consumed samples:\s+(?P<samples>\d+) \|"
    r" elapsed time per iteration \(ms\): (?P<ms>[\d.]+) \|"
    r" learning rate: (?P<lr>[-+.\dE]+) \|"
    r" global batch size:\s+(?P<gbs>\d+) \|"
    r" lm loss: (?P<loss>[-+.\dE]+) \|"
    r" loss scale: (?P<scale>[\d.]+) \|"
    r" grad norm: (?P<grad_norm>[\d.]+) \|"
    r" number of skipped iterations:\s+(?P<skipped>\d+) \|"
    r" number of nan iterations:\s+(?P<nan>\d+) \|$"
)
MEGATRON_TB_TAGS = {"lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm"}


def parse(lines: list[str]) -> list[dict]:
    return [m.groupdict() for m in map(MEGATRON_LINE.match, lines) if m]


def test_line_and_tensorboard_tags(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_patch.training.logging import MetricsLogger

    logger = MetricsLogger(2, str(tmp_path / "tb"), 512, train_iters=20, global_batch_size=8)
    losses = [4.0, 3.0, float("nan"), 2.0, 1.5, 1.0]
    for step, loss in enumerate(losses, 1):
        logger.log_step(step, loss, 2e-5 * step, 0.5 * step, skipped=step == 5, loss_scale=None,
                        consumed_samples=8 * step + 100)
    logger.log_eval(6, 2.0)
    logger.close()
    out = capsys.readouterr().out.splitlines()
    rows = parse(out)
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6], out
    first, second, third = rows
    assert first["train_iters"] == "20" and first["samples"] == "116" and first["gbs"] == "8"
    assert float(first["loss"]) == 3.5 and float(first["lr"]) == 4e-5 and float(first["grad_norm"]) == 1.0
    assert float(first["scale"]) == 1.0 and first["skipped"] == "0" and first["nan"] == "0"
    assert float(second["loss"]) == 2.0 and second["nan"] == "1"  # the nan step is counted, not averaged
    assert float(third["loss"]) == 1.0 and third["skipped"] == "1"  # a skipped step leaves the average too
    assert " validation loss at iteration 6 | lm loss value: 2.000000E+00 | lm loss PPL: " in "\n".join(out)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = MEGATRON_TB_TAGS | {f"{t} vs samples" for t in MEGATRON_TB_TAGS} | {
        "iteration-time", "lm loss validation", "lm loss validation vs samples", "lm loss validation ppl"}
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("lm loss vs samples")] == [108 + 8 * i for i in range(6)]
    assert [e.value for e in events.Scalars("batch-size")] == [8.0] * 6
    assert math.isclose(events.Scalars("lm loss validation")[0].value, 2.0)


def test_a_line_at_least_every_30_seconds(capsys, monkeypatch):
    """--log-interval 100 at 16 s per iteration would be 27 minutes of silence: a line comes once 30 s have passed."""
    from megatron_patch.training import logging as training_logging

    clock = iter(float(t) for t in range(0, 10_000, 16))  # one call per step after the constructor's
    monkeypatch.setattr(training_logging.time, "perf_counter", lambda: next(clock))
    logger = training_logging.MetricsLogger(100, None, 512, train_iters=100, global_batch_size=8)
    for iteration in range(1, 7):
        logger.log_step(iteration, 2.0, 1e-4, 1.0, False)
    printed = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    assert [re.search(r"iteration\s+(\d+)/", line).group(1) for line in printed] == ["2", "4", "6"]


def test_rl_and_preference_lines_at_least_every_30_seconds(monkeypatch):
    """The PPO/GRPO loop and the preference trainers print every --log-interval iterations and once 30 s passed."""
    from megatron_patch.training import logging as training_logging

    clock = iter([0.0, 10.0, 31.0, 40.0, 45.0, 76.0])  # the constructor, then one call per iteration
    monkeypatch.setattr(training_logging.time, "perf_counter", lambda: next(clock))
    logger = training_logging.MetricsLogger(4, None, 512)
    assert [logger.line_due(iteration) for iteration in range(1, 6)] == [False, True, False, True, True]
