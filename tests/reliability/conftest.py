"""Tally of the replayed bad-input cases (issue 13), printed at the end of the run."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from megatron_patch.checkpoint.checksums import MANIFEST

# "silent": a wrong exit 0; "hangs" and "code run" are counted by the cases that can produce them.
OUTCOMES = ("tried", "refused cleanly", "tracebacks", "silent", "hangs", "partial outputs", "code run")
TALLY: Counter = Counter()


def pytest_terminal_summary(terminalreporter):
    if TALLY["tried"]:
        counts = " / ".join(f"{name} {TALLY[name]}" for name in OUTCOMES)
        terminalreporter.write_line(f"reliability cases: {counts}")


def without_manifests(root):
    """``root`` with its checksum manifests removed: a case that crafts a file models a writer who would drop or
    rewrite the manifest too (or a checkpoint of Megatron-LM, which has none), so the checks behind the checksum
    must hold on their own. ``test_checksums`` covers the manifests."""
    for manifest in Path(root).rglob(MANIFEST):
        manifest.unlink()
    return root


@pytest.fixture(scope="session")
def converted(make_hf, tmp_path_factory):
    """A tiny HF llama converted to torch_dist (manifest dropped, see ``without_manifests``), shared read-only by
    the cases (copy it before damaging it)."""
    from megatron_patch.convert.__main__ import main as convert_main

    out = tmp_path_factory.mktemp("converted") / "ckpt"
    assert convert_main(["hf2mcore", "--load", make_hf("reliability-shared"), "--save", str(out)]) == 0
    return without_manifests(out)


@pytest.fixture
def ckpt(converted, tmp_path):
    """A private copy of ``converted``, and a folder of the user's beside it holding a secret."""
    copy = tmp_path / "ckpt"
    shutil.copytree(converted, copy)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "id_rsa").write_text("PRIVATE KEY")
    return copy


def refused(code: int, capsys, expected: str) -> str:
    """Tally one CLI case; return its stderr after checking: exit 1, no traceback, ``expected`` in the line."""
    TALLY["tried"] += 1
    err = capsys.readouterr().err
    TALLY["silent"] += code == 0
    TALLY["tracebacks"] += "Traceback" in err
    assert code == 1, err
    assert "Traceback" not in err and expected in err, err
    TALLY["refused cleanly"] += 1
    return err
