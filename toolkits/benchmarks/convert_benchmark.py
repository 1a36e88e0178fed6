"""Conversion cost against the floor: plain safetensors read + re-write of the same tensors, in the same run.

    python toolkits/benchmarks/convert_benchmark.py [--workdir DIR] [--layers 6] [--tp 2 --pp 2]

Writes a random llama checkpoint of ~1.6 GB (fp32; use --dtype bfloat16 for half), then times
  baseline   read every tensor with safetensors and write them all back (one process)
  hf2mcore   the converter CLI at TP x PP (torch_dist: one process per rank), and legacy
  mcore2hf   back to HF from each
and prints each time / baseline time and the peak memory of the whole process tree / checkpoint size, as PSS
summed over processes (shared pages count once; includes the page cache of memory-mapped files) and as anonymous
PSS (what the processes allocated: interpreters, tensors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def make_checkpoint(out: Path, layers: int, dtype: torch.dtype) -> int:
    """A llama-shaped HF directory with random weights (no transformers init: that would dominate the run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**config)).state_dict().items()}
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, shards, total = {}, 0, [], 0
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=dtype).normal_(std=0.02, generator=generator)
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes > 500 * 2**20:
            shards.append(shard)
            total += shard_bytes
            shard, shard_bytes = {}, 0
    if shard:
        shards.append(shard)
        total += shard_bytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return total


def baseline_read_write(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / fname), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})


def _pss(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) in bytes: shared pages are split between the processes that map them."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("Pss", 0), fields.get("Pss_Anon", 0)


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """Wall time, peak PSS and peak anonymous PSS summed over the process tree (polled every 50 ms).

    PSS includes the page cache of memory-mapped checkpoint files; anonymous PSS is the memory the process
    tree allocated itself (tensors, interpreter), the part that "two copies of the model" would show in."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, peak_anon = 0, 0
    while proc.poll() is None:
        total, anon = 0, 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                pss, pss_anon = _pss(p.pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            total, anon = total + pss, anon + pss_anon
        peak, peak_anon = max(peak, total), max(peak_anon, anon)
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, peak, peak_anon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/convert_benchmark")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    size = make_checkpoint(work / "hf", args.layers, getattr(torch, args.dtype))
    print(f"checkpoint: {size / 2**30:.2f} GiB ({args.layers} layers, {args.dtype})", flush=True)

    # The baseline runs as its own process, measured the same way as the converter.
    baseline_code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                     f"from convert_benchmark import baseline_read_write; from pathlib import Path; "
                     f"baseline_read_write(Path({str(work / 'hf')!r}), Path({str(work / 'baseline')!r}))")
    base_time, base_mem, base_anon = run_measured([sys.executable, "-c", baseline_code])
    rows = [("safetensors read + write (baseline)", base_time, base_mem, base_anon)]
    convert = [sys.executable, "-m", "megatron_patch.convert"]
    for fmt in ("torch_dist", "legacy"):
        mc = work / f"mcore_{fmt}"
        measured = run_measured(convert + ["hf2mcore", "--load", str(work / "hf"), "--save", str(mc), "--tp",
                                           str(args.tp), "--pp", str(args.pp), "--format", fmt])
        rows.append((f"hf2mcore {fmt} TP={args.tp} PP={args.pp}", *measured))
        measured = run_measured(convert + ["mcore2hf", "--load", str(mc), "--save", str(work / f"back_{fmt}")])
        rows.append((f"mcore2hf from {fmt}", *measured))

    print(f"\n{'step':40} {'seconds':>8} {'x baseline':>11} {'peak PSS / ckpt':>16} {'peak anon PSS / ckpt':>21}")
    for name, seconds, memory, anon in rows:
        print(f"{name:40} {seconds:8.1f} {seconds / base_time:11.2f} {memory / size:16.2f} {anon / size:21.2f}")


if __name__ == "__main__":
    main()
