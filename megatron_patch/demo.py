"""python -m megatron_patch.demo [--workdir DIR] [--pretrain-iters 200] [--sft-iters 20]

The whole pipeline on a CPU with gloo, on what the repo ships: a small HF llama (``tiny`` flavor, seeded random
weights, tokenizer trained on the shipped corpus) -> hf2mcore at PP=2 -> the corpus preprocessed into an indexed
dataset -> pretraining at PP=2 (two processes) -> SFT -> mcore2hf -> transformers loads the result and generates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _train_worker(cfg: dict, quiet: bool):
    from .training.loop import run

    return run(cfg, quiet=quiet)


def _stage(name: str, timings: list, fn, *args, **kwargs):
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings.append((name, time.perf_counter() - start))
    return result


def _loss_table(history: list[tuple[int, float]], rows: int = 8) -> str:
    step = max(1, len(history) // rows)
    picked = history[::step] + ([history[-1]] if (len(history) - 1) % step else [])
    return "\n".join(f"  {it:6d}  {loss:8.4f}" for it, loss in picked)


def main(argv=None) -> int:
    from .runtime.noise import add_verbose_flag, quiet_third_party

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--pretrain-iters", type=int, default=200, help="pretraining steps (default: 200)")
    parser.add_argument("--sft-iters", type=int, default=20, help="finetuning steps (default: 20)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sample (default: 128)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_third_party(args.verbose or None)
    from .errors import run_reporting_errors

    return run_reporting_errors(lambda: run_demo(args))


def run_demo(args: argparse.Namespace) -> int:
    """The stages of the demo; returns 0 when the pretraining loss fell."""
    from .convert.hf_to_mcore import hf_to_mcore
    from .data.indexed import build_indexed_dataset
    from .data.sft import write_demo_sft
    from .models import get_family
    from .models.tiny import CORPUS, make_hf_checkpoint
    from .runtime import run_on_local_ranks

    work = Path(args.workdir or tempfile.mkdtemp(prefix="megatron_patch_demo_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working directory: {work}")
    timings: list[tuple[str, float]] = []
    hf_dir, mcore_dir = work / "hf_tiny_llama", work / "mcore_pp2"

    _stage("1. HF llama (tiny flavor, offline tokenizer)", timings, make_hf_checkpoint, hf_dir,
           get_family("llama").flavor("tiny"), seed=0)
    _stage("2. hf2mcore -> torch_dist, PP=2", timings, hf_to_mcore, hf_dir, mcore_dir, tp=1, pp=2, overwrite=True)

    jsonl = work / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS.read_text().splitlines() if line.strip()))
    summary = _stage("3. preprocess the corpus -> indexed dataset", timings, build_indexed_dataset, jsonl,
                     work / "corpus_text_document", hf_dir, workers=2)
    print(summary.line())

    pretrain_dir = work / "pretrain"
    pretrain = dict(mode="pretrain", load=str(mcore_dir), save=str(pretrain_dir), data_path=[summary.output_prefix],
                    split="98,2,0", pipeline_model_parallel_size=2, seq_length=args.seq_length, micro_batch_size=2,
                    global_batch_size=8, train_iters=args.pretrain_iters, lr=2e-3, min_lr=2e-4,
                    lr_warmup_iters=max(1, args.pretrain_iters // 20), log_interval=max(1, args.pretrain_iters // 10),
                    save_interval=max(1, args.pretrain_iters // 2), eval_interval=args.pretrain_iters, eval_iters=2,
                    tensorboard_dir=str(work / "tensorboard" / "pretrain"))
    history = _stage(f"4. pretrain {args.pretrain_iters} steps at PP=2 (2 processes, gloo)", timings,
                     run_on_local_ranks, _train_worker, 2, pretrain, False, timeout=3600)[0]

    sft_dir = work / "sft"
    train_jsonl = write_demo_sft(CORPUS, work / "sft_train.jsonl", limit=400)
    valid_jsonl = work / "sft_valid.jsonl"
    valid_jsonl.write_text("".join(Path(train_jsonl).read_text().splitlines(keepends=True)[-32:]))
    sft = dict(mode="finetune", load=str(pretrain_dir), save=str(sft_dir), train_data_path=train_jsonl,
               valid_data_path=str(valid_jsonl), pipeline_model_parallel_size=2, seq_length=256,
               max_padding_length=256, sft_packing=True, micro_batch_size=2, global_batch_size=4,
               train_iters=args.sft_iters, lr=1e-3, min_lr=1e-4, log_interval=max(1, args.sft_iters // 5),
               eval_interval=args.sft_iters, tensorboard_dir=str(work / "tensorboard" / "sft"))
    sft_history = _stage(f"5. SFT {args.sft_iters} steps (packed samples, loss on responses)", timings,
                         run_on_local_ranks, _train_worker, 2, sft, False, timeout=3600)[0]

    hf_out = work / "hf_trained"
    _stage("6. mcore2hf", timings, run_on_local_ranks, _convert_worker, 1, str(sft_dir), str(hf_out), timeout=600)

    prompt = "The old lighthouse keeper"
    text = _stage("7. transformers loads it and generates", timings, _generate, hf_out, prompt)
    print(f"prompt: {prompt!r}\ngenerated: {text!r}")

    print("\n=== pretraining loss (iteration, lm loss) ===")
    print(_loss_table(history))
    print("=== SFT loss ===")
    print(_loss_table(sft_history, rows=5))
    print("\n=== summary ===")
    print(f"  {'stage':58s} {'seconds':>8s}")
    for name, seconds in timings:
        print(f"  {name:58s} {seconds:8.1f}")
    print(f"  {'total':58s} {sum(s for _, s in timings):8.1f}")
    first, last = history[0][1], history[-1][1]
    print(f"pretraining loss {first:.3f} -> {last:.3f}; SFT loss {sft_history[0][1]:.3f} -> {sft_history[-1][1]:.3f}")
    return 0 if last < first else 1


def _convert_worker(load: str, save: str) -> str:
    from .convert.mcore_to_hf import mcore_to_hf

    return str(mcore_to_hf(load, save, overwrite=True))


def _generate(hf_dir: Path, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
