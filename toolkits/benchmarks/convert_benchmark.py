"""Conversion cost against the floor: plain safetensors read + re-write of the same tensors, in the same run.

    python toolkits/benchmarks/convert_benchmark.py [--workdir DIR] [--size-gb 5 | --layers 6] [--tp 2 --pp 2]
        [--model mixtral --ep 2] [--steps mcore2hf:legacy ...] [--repeat N]

Writes a random llama checkpoint (hidden 2048, fp32 unless --dtype bfloat16; --size-gb picks the number of layers,
default 6 layers = 1.6 GB), or with ``--model mixtral`` a mixture of experts of the same hidden size (8 experts of FFN
width 1408, top-2: many small tensors per layer, placed on ``--ep`` expert-parallel ranks), then times
  baseline   read every tensor with safetensors and write them all back (one process), around every step
  hf2mcore   the converter CLI at TP x PP, torch_dist and legacy
  mcore2hf   back to HF from each
(``--steps`` times only some of them: an mcore2hf step whose hf2mcore is not selected still runs that hf2mcore, untimed;
``--repeat N`` times each selected step N times, each against its own baselines, for medians on a noisy machine;
``--checksum-cost`` also times each step without the checksum manifest (hf2mcore hashing nothing as it writes,
mcore2hf also with ``--no-verify-checksums``), right after it, and prints with / without)
and prints each time / baseline time (the mean of the baseline runs just before and after the step: the machine may
be shared) and the peak memory of the whole process tree / checkpoint size, as PSS summed over processes (shared
pages count once; includes the page cache of memory-mapped files) and as anonymous PSS (what the processes
allocated: interpreters, tensors). Every step starts from the same state (``settle``, untimed: no dirty pages, warm
free memory, its input in the page cache), so none pays for the writeback or the memory of the one before. The
converters write past the page cache where the filesystem allows it (``checkpoint/bulk_file.py``);
``MEGATRON_PATCH_DIRECT_IO=0`` in the environment times them with ordinary writes. The "before" column holds the numbers
issue 9 measured for the per-rank torch_dist writer this one replaced (1.5 GB fp32, TP2 PP2); that writer is no longer
selectable, so it is not re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Measured by issue 9 on this machine class for the replaced converter (1.5 GB fp32 llama, TP2 PP2):
# (time / baseline, peak PSS / checkpoint). Only hf2mcore to torch_dist was reported.
BEFORE = {"hf2mcore torch_dist": ("8.6-8.9", "4.7")}
STEPS = ("hf2mcore:torch_dist", "mcore2hf:torch_dist", "hf2mcore:legacy", "mcore2hf:legacy")


def model_config(model: str, layers: int, dtype: torch.dtype) -> dict:
    if model == "mixtral":
        config = llama_config(layers, dtype)
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=1408,
                      num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
        return config
    return llama_config(layers, dtype)


def llama_config(layers: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def tensor_shapes(config: dict) -> dict[str, torch.Size]:
    if config["model_type"] == "mixtral":
        return mixtral_shapes(config)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return {k: v.shape for k, v in AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).state_dict().items()}


def mixtral_shapes(config: dict) -> dict[str, torch.Size]:
    """The tensors of a Mixtral checkpoint as saved (one per expert; transformers 5 fuses them only in memory)."""
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes.update({f"{prefix}.input_layernorm.weight": (h,), f"{prefix}.post_attention_layernorm.weight": (h,),
                       f"{prefix}.self_attn.q_proj.weight": (h, h), f"{prefix}.self_attn.k_proj.weight": (kv, h),
                       f"{prefix}.self_attn.v_proj.weight": (kv, h), f"{prefix}.self_attn.o_proj.weight": (h, h),
                       f"{prefix}.block_sparse_moe.gate.weight": (config["num_local_experts"], h)})
        for expert in range(config["num_local_experts"]):
            moe = f"{prefix}.block_sparse_moe.experts.{expert}"
            shapes.update({f"{moe}.w1.weight": (ffn, h), f"{moe}.w3.weight": (ffn, h), f"{moe}.w2.weight": (h, ffn)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return {name: torch.Size(shape) for name, shape in shapes.items()}


def layers_for_size(size_gb: float, dtype: torch.dtype, pp: int, model: str = "llama") -> int:
    """The fewest layers (a multiple of ``pp``) whose checkpoint holds at least ``size_gb`` GiB."""
    def nbytes(layers):
        return sum(s.numel() for s in tensor_shapes(model_config(model, layers, dtype)).values()) * dtype.itemsize

    per_layer = nbytes(2) - nbytes(1)
    layers = max(1, math.ceil((size_gb * 2**30 - (nbytes(1) - per_layer)) / per_layer))
    return layers + (-layers % pp)


def make_checkpoint(out: Path, layers: int, dtype: torch.dtype, model: str = "llama") -> int:
    """A llama- (or mixtral-) shaped HF directory with random weights (no transformers init: that would dominate the
    run)."""
    config = model_config(model, layers, dtype)
    shapes = tensor_shapes(config)
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


def settle(scratch_dir: Path, nbytes: int, step_input: Path) -> None:
    """Bring the machine to the same state before every step (untimed): no dirty pages, warm free memory, and the
    step's input in the page cache.

    Without it a step's time depends on what ran before it: a step that writes gigabytes while the previous step's
    output still waits for writeback is throttled to the disk's speed (measured: the same baseline took 11 s after
    a sync, 27 s right after another baseline); and on a virtual machine whose free memory goes back to the host,
    the page cache for a step's output costs a host fault per page unless that memory was just used (measured: a
    baseline that had just deleted its own previous output wrote at 4.6 GB/s, a converter writing into memory freed
    long before at 0.4-1.4 GB/s). So: write and delete a scratch file as large as the checkpoint, then sync.
    Last, every file of ``step_input`` is read: the baseline reads the HF checkpoint from the page cache, and the
    converters write past it (``O_DIRECT``), so without this an mcore2hf step would read its input from the disk
    where the baseline reads memory (measured, same code: mcore2hf from torch_dist 1.59-2.48x with its input on
    disk, 1.35-1.61x with it cached)."""
    scratch = scratch_dir / "settle.scratch"
    block = bytearray(64 << 20)
    with open(scratch, "wb") as handle:
        for _ in range(max(1, nbytes // len(block))):
            handle.write(block)
    scratch.unlink()
    os.sync()
    for path in sorted(step_input.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(block):
                    pass


# The converter with the checksums of ``checkpoint/checksums.py`` switched off (benchmark only: the product always
# writes them): a digest that does nothing and no manifest. ``--no-verify-checksums`` is passed on the command line.
WITHOUT_CHECKSUMS = """
import os
import sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the converter's main() sets it before torch loads
from megatron_patch.checkpoint import checksums
class _NoDigest:
    def update(self, data): pass
    def hexdigests(self): return []
checksums.ChunkedDigest = _NoDigest
checksums.remember = lambda *args: None
checksums.write_manifest = lambda directory: None
for name in ("megatron_patch.convert.hf_to_mcore", "megatron_patch.convert.mcore_to_hf"):
    __import__(name)
    sys.modules[name].write_manifest = checksums.write_manifest
from megatron_patch.convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def cpu_seconds_of(cmd: list[str], settle_first) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and the children it waited for). On a shared
    machine CPU time is the steadier measure of work added (a hash is CPU work; wall time also counts waiting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = run_measured(cmd, settle_first)[0]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def run_measured(cmd: list[str], settle_first=None) -> tuple[float, int, int]:
    """Wall time, peak PSS and peak anonymous PSS summed over the process tree (polled every 50 ms).

    PSS includes the page cache of memory-mapped checkpoint files; anonymous PSS is the memory the process
    tree allocated itself (tensors, interpreter), the part that "two copies of the model" would show in.
    ``settle_first`` (untimed) runs before the clock starts (``settle``)."""
    if settle_first is not None:
        settle_first()
    os.sync()
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
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--layers", type=int, default=None, help="decoder layers (default 6 = 1.6 GB in fp32)")
    size.add_argument("--size-gb", type=float, default=None, help="smallest checkpoint size in GiB to reach")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--model", choices=("llama", "mixtral"), default="llama",
                        help="llama (default) or mixtral: a mixture of experts of the same hidden size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixtral only; default 1)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="the steps to time (default: all four)")
    parser.add_argument("--repeat", type=int, default=1, help="time each selected step this many times")
    parser.add_argument("--checksum-cost", action="store_true",
                        help="also time each step without the checksum manifest, right after it")
    parser.add_argument("--reuse-checkpoint", action="store_true",
                        help="keep WORKDIR/hf from an earlier run with the same shape instead of writing it again")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.ep != 1 and args.model != "mixtral":
        parser.error("--ep needs --model mixtral")
    layers = args.layers or (layers_for_size(args.size_gb, dtype, args.pp, args.model) if args.size_gb else 6)
    work = Path(args.workdir)
    hf = work / "hf"
    reuse = args.reuse_checkpoint and (hf / "config.json").is_file() and \
        json.loads((hf / "config.json").read_text()) == model_config(args.model, layers, dtype)
    for child in (work.iterdir() if work.is_dir() else []):
        if not (reuse and child == hf):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if not reuse:
        make_checkpoint(hf, layers, dtype, args.model)
    size = json.loads((hf / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"checkpoint: {size / 2**30:.2f} GiB ({args.model}, {layers} layers, {args.dtype}), TP={args.tp} "
          f"PP={args.pp} EP={args.ep}", flush=True)

    def settled(step_input: Path = hf):
        return lambda: settle(work, size, step_input)

    # The baseline runs as its own process, measured the same way as the converter, before and after the rest.
    def baseline():
        shutil.rmtree(work / "baseline", ignore_errors=True)
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"from convert_benchmark import baseline_read_write; from pathlib import Path; "
                f"baseline_read_write(Path({str(hf)!r}), Path({str(work / 'baseline')!r}))")
        return run_measured([sys.executable, "-c", code], settle_first=settled())

    # The machine is shared: each step is compared with the mean of the baseline runs just before and after it.
    baselines = [baseline()]
    rows = []
    checksum_rows = []  # (step, seconds with checksums, seconds without)
    unchecked = [sys.executable, "-c", WITHOUT_CHECKSUMS]
    convert = [sys.executable, "-m", "megatron_patch.convert"]
    for fmt in ("torch_dist", "legacy"):
        mc = work / f"mcore_{fmt}"
        steps = [(f"hf2mcore:{fmt}", f"hf2mcore {fmt}", ["hf2mcore", "--load", str(hf), "--save", str(mc), "--tp",
                                                         str(args.tp), "--pp", str(args.pp), "--ep", str(args.ep),
                                                         "--format", fmt]),
                 (f"mcore2hf:{fmt}", f"mcore2hf from {fmt}", ["mcore2hf", "--load", str(mc), "--save",
                                                              str(work / f"back_{fmt}")])]
        if not any(key in args.steps for key, _, _ in steps):
            continue
        for key, name, cli in steps:
            if key not in args.steps:
                if key.startswith("hf2mcore"):  # the input of the timed mcore2hf, untimed
                    subprocess.run(convert + cli, check=True, stdout=subprocess.DEVNULL)
                continue
            for _ in range(args.repeat):
                shutil.rmtree(mc if key.startswith("hf2mcore") else work / f"back_{fmt}", ignore_errors=True)
                step_input = hf if key.startswith("hf2mcore") else mc
                if args.checksum_cost:
                    with_time, with_cpu = cpu_seconds_of(convert + cli, settled(step_input))
                    rows.append((name, with_time, 0, 0))  # memory is measured by the runs without --checksum-cost
                else:
                    rows.append((name, *run_measured(convert + cli, settle_first=settled(step_input))))
                if args.checksum_cost:  # the same step at once, without checksums (its output replaced)
                    shutil.rmtree(mc if key.startswith("hf2mcore") else work / f"back_{fmt}", ignore_errors=True)
                    flags = ["--no-verify-checksums"] if key.startswith("mcore2hf") else []
                    without, without_cpu = cpu_seconds_of(unchecked + cli + flags, settled(step_input))
                    if key.startswith("hf2mcore"):  # written again with its manifest: mcore2hf reads it checked
                        shutil.rmtree(mc)
                        subprocess.run(convert + cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    checksum_rows.append((name, with_time, without, with_cpu, without_cpu))
                    print(f"  {name} without checksums: {without:.1f} s ({without_cpu:.1f} CPU s; with: "
                          f"{with_cpu:.1f} CPU s)", flush=True)
                baselines.append(baseline())
                print(f"  {name}: {rows[-1][1]:.1f} s (baselines around it {baselines[-2][0]:.1f} s, "
                      f"{baselines[-1][0]:.1f} s)", flush=True)
        shutil.rmtree(work / f"back_{fmt}", ignore_errors=True)  # keep the disk footprint at about three checkpoints
        shutil.rmtree(mc)
    shutil.rmtree(work / "baseline")

    print(f"\n{'step':34} {'seconds':>8} {'x baseline':>11} {'peak PSS / ckpt':>16} {'peak anon PSS / ckpt':>21}"
          f"   before: x baseline, peak / ckpt")
    for i, (seconds, memory, anon) in enumerate(baselines):
        print(f"{f'baseline {i + 1}: safetensors read + write':34} {seconds:8.1f} {'':>11} {memory / size:16.2f} "
              f"{anon / size:21.2f}")
    for i, (name, seconds, memory, anon) in enumerate(rows):
        base_time = (baselines[i][0] + baselines[i + 1][0]) / 2
        before = BEFORE.get(name) if args.model == "llama" else None  # measured for the llama shape only
        before = f"   {before[0]:>8}, {before[1]}" if before else ""
        print(f"{name:34} {seconds:8.1f} {seconds / base_time:11.2f} {memory / size:16.2f} {anon / size:21.2f}{before}")
    if checksum_rows:
        print(f"\n{'step':34} {'wall with':>10} {'without':>8} {'ratio':>6} {'CPU with':>9} {'without':>8} {'ratio':>6}")
        for name, with_time, without, with_cpu, without_cpu in checksum_rows:
            print(f"{name:34} {with_time:10.1f} {without:8.1f} {with_time / without:6.3f} {with_cpu:9.1f} "
                  f"{without_cpu:8.1f} {with_cpu / without_cpu:6.3f}")


if __name__ == "__main__":
    main()
