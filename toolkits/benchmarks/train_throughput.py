"""Training throughput of megatron-patch against a plain transformers loop, measured side by side; preprocessing too.

Training: the toolkit's ``train_step`` (megatron-core GPTModel with the local layer spec, megatron-core DDP and
optimizer, the pipeline schedule, grad clipping) against a plain PyTorch loop over transformers' ``LlamaForCausalLM``
of the same shape, batch, sequence length and optimizer (Adam, same betas/eps/weight decay, grad clipping 1.0).
The MoE shapes (``--shape moe-small`` / ``moe-gpu``, or ``--experts N --topk K``) are Mixtral-shaped: every layer a
mixture of N SwiGLU experts of width ``--ffn``, top K; the toolkit's side is megatron-core's MoE layer (router,
alltoall dispatcher, SequentialMLP experts) at EP=1, the baseline transformers' ``MixtralForCausalLM`` (its default
grouped_mm experts on the CPU; on CUDA its per-expert loop, which bf16 autocast reaches); neither adds the
load-balancing loss (transformers' ``output_router_logits`` off, ``--moe-aux-loss-coeff`` 0).
On CUDA the baseline is what a careful user writes: fp32 weights, SDPA attention, bf16 autocast, fused AdamW; the
toolkit trains bf16 weights with fp32 main weights and fp32 gradient buffers. Each side (and the matmul probe) runs
in its own fresh process, alternating A, B for ``--rounds`` rounds; a round reports the median step time.

Reported per side: ms/step, tokens/s, model TFLOP/s, MFU against the datasheet peak (bf16 dense; known for
H100/H200) and against a matmul measured in the same run, and peak memory (CUDA: max allocated; CPU: max RSS).
Model FLOPs per step follow the usual convention (Megatron-LM, PaLM): per token 6 x the matmul parameters (output
layer included, embedding lookup excluded) + 12 x layers x sequence x attention width (causal attention not halved).

    python toolkits/benchmarks/train_throughput.py --device cuda            # 7b-layer shape, bf16
    python toolkits/benchmarks/train_throughput.py --device cpu             # small shape, fp32
    python toolkits/benchmarks/train_throughput.py --device cpu --shape small --layers 2 --skip-preprocessing
    python toolkits/benchmarks/train_throughput.py --device cpu --shape moe-small --skip-preprocessing  # MoE

Preprocessing (``--skip-training --corpus-mb 200``): the preprocessing CLI (jsonl -> indexed dataset: parse,
tokenize, EOD, write) at 1, 2 and all cores' workers against one process of the bare tokenizer encoding the same
documents in a loop; tokens/s, MB/s, the ratios to bare and to N x bare, and the peak RSS of the process tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    seq_length: int
    micro_batch_size: int
    dtype: str  # "float32" | "bfloat16"
    experts: int = 0  # 0: dense (llama); else a Mixtral-shaped MoE: every layer routes to ``topk`` of ``experts``
    topk: int = 0

    @property
    def family(self) -> str:
        return "mixtral" if self.experts else "llama"

    def flops_per_step(self) -> float:
        """Model FLOPs of one training step (forward + backward) of one micro-batch. A MoE layer counts the matmuls a
        token runs through: the router and its top-k experts (not the experts it skips)."""
        head_dim = self.hidden // self.heads
        attention_width = self.heads * head_dim
        mlp = 3 * self.hidden * self.ffn  # SwiGLU fc1 (gate, up) + fc2
        if self.experts:
            mlp = self.topk * mlp + self.hidden * self.experts
        per_layer = (self.hidden * (attention_width + 2 * self.kv_heads * head_dim)  # qkv
                     + attention_width * self.hidden  # proj
                     + mlp)
        matmul_params = self.layers * per_layer + self.vocab * self.hidden  # + output layer
        per_token = 6 * matmul_params + 12 * self.layers * self.seq_length * attention_width
        return per_token * self.seq_length * self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size


SHAPES = {
    # The CPU shape this benchmark has always used.
    "small": Shape(layers=4, hidden=256, ffn=680, heads=8, kv_heads=8, vocab=2048, seq_length=256,
                   micro_batch_size=4, dtype="float32"),
    # Four llama-7B layers: the shape of shared/notes/gpu-facts.md.
    "7b-layer": Shape(layers=4, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, seq_length=4096,
                      micro_batch_size=1, dtype="bfloat16"),
    # "small" with 8 experts of about a quarter of its FFN width (176: transformers 5 runs its experts through
    # grouped_mm, which needs rows of a multiple of 16 bytes), top-2.
    "moe-small": Shape(layers=4, hidden=256, ffn=176, heads=8, kv_heads=8, vocab=2048, seq_length=256,
                       micro_batch_size=4, dtype="float32", experts=8, topk=2),
    # Half a Mixtral-8x7B layer's widths (hidden 2048, 8 experts of 5632, top-2, 4 kv heads), 4 layers: ~1.3B
    # parameters, ~23 GB of bf16 weights + fp32 main weights, gradients and Adam state on the toolkit's side.
    "moe-gpu": Shape(layers=4, hidden=2048, ffn=5632, heads=16, kv_heads=4, vocab=32000, seq_length=4096,
                     micro_batch_size=1, dtype="bfloat16", experts=8, topk=2),
}

# bf16 dense tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (SXM parts; datasheets).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def datasheet_peak(device_name: str) -> float | None:
    for key, tflops in sorted(DATASHEET_BF16_TFLOPS.items(), key=lambda item: -len(item[0])):
        if key in device_name:
            return tflops
    return None


# --- the two sides (each in its own process) -----------------------------------------------------------------------


def hf_config(shape: Shape) -> dict:
    from megatron_patch.models import get_family

    cfg = get_family(shape.family).flavor("tiny")
    cfg.update(num_hidden_layers=shape.layers, hidden_size=shape.hidden, intermediate_size=shape.ffn,
               num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
               vocab_size=shape.vocab, max_position_embeddings=max(512, shape.seq_length), tie_word_embeddings=False)
    if shape.experts:
        cfg.update(num_local_experts=shape.experts, num_experts_per_tok=shape.topk, output_router_logits=False)
    return cfg


def batches(shape: Shape, n: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape.vocab, (shape.micro_batch_size, shape.seq_length + 1), generator=gen).to(device)
            for _ in range(n)]


def timed_steps(step, samples, warmup: int, device) -> dict[str, list[float]]:
    """Wall seconds (``step_s``) and this process's CPU seconds (``cpu_s``) of each step after ``warmup`` steps;
    the device is synchronised around every step."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall, cpu = [], []
    for i, sample in enumerate(samples):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(sample)
        sync()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"step_s": wall, "cpu_s": cpu}


def profile_steps(step, samples, device, out: Path) -> None:
    """Two more steps under torch.profiler; the operators (own time on the device first) written to ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for sample in samples:
            step(sample)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=45, max_name_column_width=70))


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_hf(shape: Shape, args, device) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config(shape))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    on_cuda = device.type == "cuda"
    experts = {}
    if shape.experts and on_cuda and int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 runs experts through grouped_mm, which autocast does not reach: with the loop's fp32 weights
        # they would multiply in fp32. Its per-expert loop ("eager", transformers 4's only one) runs them in bf16, as
        # megatron-core's SequentialMLP does on the other side.
        experts = {"experts_implementation": "eager"}
    torch.manual_seed(0)
    with device:  # initialise where it trains (a 7B-layer model initialises slowly on the host)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa", **experts)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                            **({"fused": True} if on_cuda else {}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=shape.dtype == "bfloat16")

    def step(sample):
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(input_ids=sample[:, :-1], labels=sample[:, :-1])  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    samples = batches(shape, args.warmup + args.steps, device)
    times = timed_steps(step, samples, args.warmup, device)
    peak = peak_memory_bytes(device)
    if args.profile:
        profile_steps(step, samples[-2:], device, Path(args.profile) / "hf_ops.txt")
    return {**times, "peak_memory": peak}


def measure_toolkit(shape: Shape, args, device) -> dict:
    import torch
    from megatron.core.distributed import finalize_model_grads

    from megatron_patch.models.spec import ModelSpec
    from megatron_patch.runtime import init_distributed
    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.checkpointing import TrainerState
    from megatron_patch.training.logging import MetricsLogger
    from megatron_patch.training.loop import Trainer, train_step
    from megatron_patch.training.setup import (
        ModelSource,
        build_ddp_model,
        build_optimizer,
        build_scheduler,
        build_transformer_config,
    )
    from megatron_patch.training.step import TrainedModel

    spec = ModelSpec.from_hf_config(hf_config(shape), tp=1, family=shape.family, make_vocab_size_divisible_by=128)
    iters = args.warmup + args.steps
    cfg = TrainConfig(mode="pretrain", model_name=shape.family, model_size="tiny", tokenizer_model="-", data_path=["-"],
                      micro_batch_size=shape.micro_batch_size, global_batch_size=shape.micro_batch_size,
                      seq_length=shape.seq_length, train_iters=iters, lr=1e-4, min_lr=1e-4,
                      lr_decay_style="constant", weight_decay=0.01, clip_grad=1.0,
                      bf16=shape.dtype == "bfloat16").validate(1)
    init_distributed(1, 1, seed=0)
    source = ModelSource(spec, None, None)
    config = build_transformer_config(cfg, source)
    model = build_ddp_model(cfg, source, config)
    if device.type == "cuda":
        model.cuda(device)  # built on the host (use_cpu_initialization); a no-op once the build places it
    optimizer = build_optimizer(cfg, model)
    config.no_sync_func, config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    scheduler = build_scheduler(cfg, optimizer, iters)
    logger = MetricsLogger(1, None, 0, quiet=True)
    trainer = Trainer(cfg, TrainedModel(model, optimizer, scheduler, source), TrainerState(), None, None, iters,
                      shape.seq_length, logger)
    positions = torch.arange(shape.seq_length, device=device).unsqueeze(0).expand(shape.micro_batch_size, -1)
    loss_mask = torch.ones(shape.micro_batch_size, shape.seq_length, device=device)
    samples = [{"tokens": s[:, :-1], "labels": s[:, 1:], "loss_mask": loss_mask, "position_ids": positions}
               for s in batches(shape, iters, device)]
    def step(sample):
        train_step(trainer, iter([sample]))

    times = timed_steps(step, samples, args.warmup, device)
    peak = peak_memory_bytes(device)
    if args.profile:
        profile_steps(step, samples[-2:], device, Path(args.profile) / "toolkit_ops.txt")
    return {**times, "peak_memory": peak}


def measure_matmul(shape: Shape, args, device) -> dict:
    """TFLOP/s of the best of repeated square matmuls: bf16 8192^3 on CUDA, the run's dtype 1024^3 on the CPU."""
    import torch

    on_cuda = device.type == "cuda"
    n = 8192 if on_cuda else 1024
    dtype = torch.bfloat16 if on_cuda else getattr(torch, shape.dtype)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if on_cuda else 5
    best = float("inf")
    for _ in range(3 + args.rounds):
        times = timed_steps(lambda _: [torch.mm(a, b) for _ in range(reps)], [None] * 2, 1, device)
        best = min(best, times["step_s"][0] / reps)
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    return {"tflops": 2 * n**3 / best / 1e12, "what": f"{str(dtype).replace('torch.', '')} {n}^3 matmul",
            "device_name": name}


SIDES = {"hf": measure_hf, "toolkit": measure_toolkit, "matmul": measure_matmul}


def run_side(side: str, shape: Shape, args) -> dict:
    cmd = [sys.executable, __file__, "--_side", side, "--_shape", json.dumps(asdict(shape)), "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd += ["--profile", args.profile]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- reporting -----------------------------------------------------------------------------------------------------


def resolve_shape(args) -> Shape:
    shape = SHAPES[args.shape or ("7b-layer" if args.device == "cuda" else "small")]
    overrides = {name: getattr(args, name) for name in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab",
                                                         "seq_length", "micro_batch_size", "dtype", "experts", "topk")}
    shape = replace(shape, **{k: v for k, v in overrides.items() if v is not None})
    if args.kv_heads is None and args.heads is not None:
        shape = replace(shape, kv_heads=shape.heads)
    if shape.experts and not shape.topk:
        shape = replace(shape, topk=min(2, shape.experts))
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit(f"--heads {shape.heads} must divide --hidden {shape.hidden} and be a multiple of --kv-heads "
                         f"{shape.kv_heads}")
    if shape.experts and not 1 <= shape.topk <= shape.experts:
        raise SystemExit(f"--topk {shape.topk} must be between 1 and --experts {shape.experts}")
    if not shape.experts and shape.topk:
        raise SystemExit(f"--topk {shape.topk} needs --experts (a dense shape routes nowhere)")
    return shape


def report_training(shape: Shape, args) -> None:
    flops = shape.flops_per_step()
    experts = f"{shape.experts} experts of ffn {shape.ffn}, top-{shape.topk}" if shape.experts else f"ffn {shape.ffn}"
    print(f"shape: {shape.layers} layers, hidden {shape.hidden}, {experts}, {shape.heads} heads "
          f"({shape.kv_heads} kv), vocab {shape.vocab}; batch {shape.micro_batch_size} x seq {shape.seq_length}; "
          f"{shape.dtype}; Adam; {args.device}; {args.steps} timed steps after {args.warmup} per run; "
          f"{flops / 1e12:.3f} model TFLOP per step", flush=True)
    matmul = run_side("matmul", shape, args)
    peak = datasheet_peak(matmul["device_name"]) if args.device == "cuda" else None
    print(f"device: {matmul['device_name']}; measured {matmul['what']}: {matmul['tflops']:.3f} TFLOP/s; "
          f"datasheet bf16 dense: {f'{peak:.0f} TFLOP/s' if peak else 'n/a (not a known GPU)'}", flush=True)
    runs = {"hf": [], "toolkit": []}
    on_cpu = args.device == "cpu"
    for r in range(args.rounds):
        for side in runs:
            runs[side].append(run_side(side, shape, args))
        hf_ms, tk_ms = (1e3 * statistics.median(runs[s][-1]["step_s"]) for s in ("hf", "toolkit"))
        line = (f"round {r + 1}: transformers loop {hf_ms:.1f} ms/step | megatron-patch {tk_ms:.1f} ms/step "
                f"-> ratio {hf_ms / tk_ms:.2f}")
        if on_cpu:
            hf_cpu, tk_cpu = (1e3 * statistics.median(runs[s][-1]["cpu_s"]) for s in ("hf", "toolkit"))
            line += f" (CPU time {hf_cpu:.1f} vs {tk_cpu:.1f} ms/step -> ratio {hf_cpu / tk_cpu:.2f})"
        print(line, flush=True)

    def median_of_runs(side_runs, key):
        return statistics.median(statistics.median(run[key]) for run in side_runs)

    def row(name, side_runs):
        step = median_of_runs(side_runs, "step_s")
        tflops = flops / step / 1e12
        mfu_sheet = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        memory = max(run["peak_memory"] for run in side_runs) / GIB
        cpu = f" {1e3 * median_of_runs(side_runs, 'cpu_s'):.1f} |" if on_cpu else ""
        print(f"| {name} | {1e3 * step:.1f} |{cpu} {shape.tokens_per_step / step:,.0f} | {tflops:.3f} | {mfu_sheet} | "
              f"{100 * tflops / matmul['tflops']:.1f}% | {memory:.2f} GiB |")
        return step

    cpu_header = " CPU ms/step |" if on_cpu else ""
    print(f"| side | ms/step (median) |{cpu_header} tokens/s | model TFLOP/s | MFU (datasheet) | MFU (measured matmul) "
          "| peak memory |")
    print("| --- " * (8 if on_cpu else 7) + "|")
    hf_step = row(f"transformers {'MixtralForCausalLM' if shape.experts else 'LlamaForCausalLM'} loop", runs["hf"])
    tk_step = row("megatron-patch train_step", runs["toolkit"])
    ratios = [statistics.median(h["step_s"]) / statistics.median(t["step_s"]) for h, t in zip(runs["hf"], runs["toolkit"])]
    summary = (f"training throughput megatron-patch / transformers loop: {hf_step / tk_step:.2f}x "
               f"(per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})")
    if on_cpu:
        # On a shared host the wall clock includes other processes' load; CPU seconds of each process do not.
        cpu_ratio = median_of_runs(runs["hf"], "cpu_s") / median_of_runs(runs["toolkit"], "cpu_s")
        summary += f"; by CPU time {cpu_ratio:.2f}x"
    print(summary)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A jsonl corpus of about ``megabytes`` MB built offline: documents of 2-40 random lines of the shipped corpus
    (a few hundred bytes to a few KB, like web text). Returns the number of documents."""
    import random

    from megatron_patch.models.tiny import CORPUS

    rng = random.Random(seed)
    sentences = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    target, written, documents = megabytes * 1e6, 0, 0
    with open(path, "w") as handle:
        while written < target:
            line = json.dumps({"text": " ".join(rng.choices(sentences, k=rng.randint(2, 40)))}) + "\n"
            handle.write(line)
            written += len(line)
            documents += 1
    return documents


def bare_tokens_per_second(tokenizer_dir: Path, corpus: Path, megabytes: float) -> float:
    """One process, the tokenizer's ``encode`` on each document of the first ``megabytes`` MB (JSON already parsed)."""
    from megatron_patch.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    texts, size = [], 0
    with open(corpus) as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= megabytes * 1e6:
                break
    start = time.perf_counter()
    tokens = sum(len(tok.encode(text)) + 1 for text in texts)
    return tokens / (time.perf_counter() - start)


def run_preprocess(corpus: Path, out: Path, tokenizer_dir: Path, workers: int) -> tuple[float, int, float]:
    """(seconds, tokens, peak RSS of the whole process tree in MB) of the preprocessing CLI, as a user runs it."""
    import psutil

    command = [sys.executable, "-m", "megatron_patch.data.preprocess", "--input", str(corpus), "--output-prefix",
               str(out), "--exact-prefix", "--tokenizer", str(tokenizer_dir), "--workers", str(workers), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass  # a process ended between the listing and the reading
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"preprocessing with {workers} worker(s) failed (exit {proc.returncode})")
    tokens = int(output.split(" documents, ")[1].split(" tokens")[0])
    return seconds, tokens, peak / 1e6


def report_preprocessing(args) -> None:
    """Tokens/s and MB/s of the CLI at 1, 2, ... all cores' workers against one process of the bare tokenizer."""
    import os

    from megatron_patch.models.tiny import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    train_tokenizer(work / "tok", vocab_size=args.vocab_for_preprocessing)
    corpus = work / "docs.jsonl"
    documents = write_corpus(corpus, args.corpus_mb)
    size_mb = corpus.stat().st_size / 1e6
    bare = bare_tokens_per_second(work / "tok", corpus, min(args.corpus_mb, args.bare_mb))
    print(f"preprocessing: {size_mb:.0f} MB, {documents} documents; bare tokenizer (one process, encode per "
          f"document, first {min(args.corpus_mb, args.bare_mb):g} MB): {bare:,.0f} tokens/s")
    for workers in sorted({1, 2, os.cpu_count() or 1}):
        seconds, tokens, peak_mb = run_preprocess(corpus, work / f"out{workers}", work / "tok", workers)
        rate = tokens / seconds
        print(f"preprocessing with {workers} worker(s): {rate:,.0f} tokens/s, {size_mb / seconds:.1f} MB/s "
              f"({seconds:.1f} s incl. start-up) -> {rate / bare:.2f}x bare, {rate / (workers * bare):.2f}x "
              f"{workers} x bare; peak RSS {peak_mb:.0f} MB")
    outputs = [(work / f"out{w}.bin").read_bytes() for w in sorted({1, 2, os.cpu_count() or 1})]
    print(f"outputs identical across worker counts: {all(o == outputs[0] for o in outputs)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="size preset (default: 7b-layer on cuda, small on cpu); the flags below override it")
    for name in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab", "seq-length", "micro-batch-size"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None,
                        help="a Mixtral-shaped MoE: every layer N experts of width --ffn (0: dense)")
    parser.add_argument("--topk", type=int, default=None, help="experts per token of a MoE shape (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 on cpu (a shared host is noisy), 1 on cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of every side (CPU; default: torch's choice)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="after the timed steps, profile two more per side; operator tables to DIR/<side>_ops.txt")
    parser.add_argument("--side-timeout", type=float, default=1800.0, help="seconds one side may run")
    parser.add_argument("--corpus-mb", type=float, default=20.0,
                        help="preprocessing: size of the jsonl corpus built offline (the README quotes 200)")
    parser.add_argument("--bare-mb", type=float, default=20.0, help="preprocessing: MB the bare tokenizer encodes")
    parser.add_argument("--vocab-for-preprocessing", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--skip-preprocessing", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--_side", choices=sorted(SIDES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.rounds is None:
        args.rounds = 3 if args.device == "cpu" else 1
    if args._side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        result = SIDES[args._side](Shape(**json.loads(args._shape)), args, device)
        print(json.dumps(result))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if not args.skip_training:
        report_training(resolve_shape(args), args)
    if not args.skip_preprocessing:
        report_preprocessing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
