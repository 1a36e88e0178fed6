"""The progress helper: tqdm at a terminal, whole lines with rate and ETA in a log."""

from __future__ import annotations

import io
import re

import pytest

from megatron_patch.runtime.progress import LineProgress, progress

LINE = re.compile(r"^(?P<desc>[\w: -]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\) \| "
                  r"(?P<rate>[\d.]+) \w+/s \| elapsed \d+:\d\d:\d\d( \| ETA \d+:\d\d:\d\d)?$")


def test_log_lines_carry_count_rate_and_eta():
    stream = io.StringIO()
    with progress(total=4, desc="hf2mcore", unit="tensor", stream=stream, interval=0) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(4):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # one per update (interval 0) and the closing one
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["n"]) for m in parsed] == [1, 2, 3, 4, 4]
    assert parsed[0]["desc"] == "hf2mcore" and parsed[0]["unit"] == "tensor" and parsed[-1]["pct"] == "100"
    assert "ETA" in lines[0] and "ETA" not in lines[-1]  # nothing left at the end
    assert "\r" not in stream.getvalue()


def test_interval_limits_lines_and_the_end_is_always_printed():
    stream = io.StringIO()
    with progress(total=1000, desc="mcore2hf", unit="tensor", stream=stream, interval=3600) as bar:
        bar.update(999)
        bar.update(1)
    assert len(stream.getvalue().splitlines()) == 1 and stream.getvalue().startswith("mcore2hf: 1000/1000 tensor")


def test_unknown_total_and_postfix():
    stream = io.StringIO()
    with progress(total=None, desc="tokenizing", unit="doc", stream=stream, interval=3600) as bar:
        bar.update(7)
        bar.set_postfix(tokens=123)
    line = stream.getvalue().strip()
    assert line.startswith("tokenizing: 7 doc | ") and line.endswith("| tokens=123") and "ETA" not in line


def test_failed_work_prints_no_closing_line_and_disabled_prints_nothing():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(total=3, desc="verify", stream=stream, interval=3600) as bar:
            bar.update(1)
            raise RuntimeError("boom")
    with progress(total=3, desc="generate", stream=stream, enabled=False, interval=0) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with progress(total=2, desc="generate", stream=Terminal()) as bar:
        assert isinstance(bar, tqdm)
        bar.update(2)
