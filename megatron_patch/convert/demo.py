"""The conversion demo on the embedded default, offline, in five steps:

  1. a tiny HF llama (seeded weights, a tokenizer trained on the shipped corpus)
  2. hf2mcore: that directory -> a Megatron checkpoint sharded for TP x PP (--format)
  3. verify: HF and Megatron logits on a fixed text, at TP x PP
  4. mcore2hf: the Megatron checkpoint -> a HF directory
  5. the round trip: every tensor of step 4 equals step 1's, bit for bit

It prints one line per step and a table at the end; exit code 1 if a step fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checkpoint.hf import HFCheckpointReader


def run_conversion_demo(workdir: str | Path, tp: int = 2, pp: int = 2, fmt: str = "torch_dist") -> list[tuple]:
    """Returns the rows of the printed table: (step, result, seconds)."""
    from ..models import get_family
    from ..models.tiny import make_hf_checkpoint
    from .hf_to_mcore import hf_to_mcore
    from .mcore_to_hf import mcore_to_hf
    from .verify import verify

    workdir = Path(workdir)
    hf_dir, mcore_dir, back_dir = workdir / "hf_llama_tiny", workdir / f"mcore_tp{tp}_pp{pp}", workdir / "hf_roundtrip"
    rows = []

    def step(name, fn):
        start = time.perf_counter()
        result = fn()
        rows.append((name, result, time.perf_counter() - start))
        print(f"[demo] {name}: {result}", flush=True)

    step("build tiny HF llama (seeded, offline tokenizer)",
         lambda: make_hf_checkpoint(hf_dir, get_family("llama").flavor("tiny")) and str(hf_dir))
    step(f"hf2mcore {fmt} TP={tp} PP={pp}",
         lambda: str(hf_to_mcore(hf_dir, mcore_dir, tp=tp, pp=pp, fmt=fmt, overwrite=True)))
    step(f"verify logits at TP={tp} PP={pp}", lambda: verify(hf_dir, mcore_dir).line())
    step("mcore2hf", lambda: str(mcore_to_hf(mcore_dir, back_dir, overwrite=True)))
    step("round trip HF -> Megatron -> HF", lambda: compare_hf_dirs(hf_dir, back_dir))
    return rows


def compare_hf_dirs(a, b) -> str:
    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return f"FAIL: tensor names differ ({len(ra.names())} vs {len(rb.names())})"
    different = [n for n in ra.names() if not torch.equal(ra.get(n), rb.get(n))]
    if different:
        return f"FAIL: {len(different)} tensors differ, e.g. {different[0]}"
    return f"bit-exact ({len(ra.names())} tensors)"


def print_table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print("\n" + "step".ljust(width) + "  seconds  result")
    for name, result, seconds in rows:
        print(f"{name.ljust(width)}  {seconds:7.1f}  {result}")
