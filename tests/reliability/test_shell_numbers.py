"""The launch scripts read numbers as Python does (issue 13, item 7): TP=010 is ten, LR=1e999 is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "examples" / "common.sh"


def bash(script: str) -> subprocess.CompletedProcess:
    prelude = f'source "{COMMON}"; mp_fail() {{ echo "FAIL $*"; exit 1; }}; '
    return subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=60)


def test_leading_zero_is_decimal_in_arithmetic_too():
    result = bash("TP=010; mp_int TP; echo $TP $((TP * 2))")
    assert result.stdout.split() == ["10", "20"], result


def test_overflowing_float_is_refused():
    result = bash("LR=1e999; mp_float LR; echo accepted")
    assert result.returncode == 1 and "LR must be a finite number" in result.stdout, result
    assert bash("LR=1e-4; mp_float LR; echo accepted").stdout.strip() == "accepted"
