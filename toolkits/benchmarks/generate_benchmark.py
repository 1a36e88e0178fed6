"""Generated tokens/s of megatron-patch's engine against transformers' ``generate`` on the same model, same run.

    python toolkits/benchmarks/generate_benchmark.py [--layers 4 --hidden 512 --batch 4 --new-tokens 64]

Writes a random llama HF checkpoint, converts it (legacy, TP=1), loads it both ways in this process, and times
greedy generation of the same prompts (same lengths, EOS disabled, so both produce exactly batch x new-tokens
tokens), alternating the two engines over ``--repeats`` rounds after a warm-up. Prints each engine's tokens/s and
engine / transformers as a ratio (of the best rounds, and of the medians), and checks that both produced the same
tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="generate-benchmark-", dir=args.workdir) as work:
        run(args, Path(work))


def run(args, work: Path) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.generation import GenerationEngine, SamplingParams, load_model
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import make_hf_checkpoint
    from megatron_patch.runtime import init_distributed

    config = {**get_family("llama").flavor("tiny"), "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": args.ffn, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "vocab_size": args.vocab, "max_position_embeddings": args.prompt_len + args.new_tokens}
    make_hf_checkpoint(work / "hf", config, seed=0, tokenizer=False)
    hf_to_mcore(work / "hf", work / "mcore", tp=1, fmt="legacy")

    init_distributed(1, 1)
    loaded = load_model(work / "mcore")
    engine = GenerationEngine(loaded.model, loaded.vocab_size, None, config["max_position_embeddings"])
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=generator)
    tokens = args.batch * args.new_tokens

    def megatron_patch_engine():
        return engine.generate(prompts.tolist(), args.new_tokens, SamplingParams(top_k=1))

    def transformers_generate():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, args.prompt_len:].tolist()

    runners = {"megatron-patch": megatron_patch_engine, "transformers": transformers_generate}
    outputs = {name: fn() for name, fn in runners.items()}  # warm-up (and the outputs to compare)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    same = outputs["megatron-patch"] == outputs["transformers"]
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, vocab "
          f"{args.vocab}; batch {args.batch} x prompt {args.prompt_len} -> {args.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, {args.repeats} rounds")
    best, median = {}, {}
    for name, values in times.items():
        best[name], median[name] = tokens / min(values), tokens / statistics.median(values)
        print(f"  {name:15s} {best[name]:9.1f} tokens/s best, {median[name]:9.1f} median  "
              f"(rounds: {', '.join(f'{v:.2f}s' for v in values)})")
    # The best round is the least disturbed by other work on the machine (what timeit reports); both are printed.
    print(f"ratio megatron-patch / transformers: {best['megatron-patch'] / best['transformers']:.2f}x best-of, "
          f"{median['megatron-patch'] / median['transformers']:.2f}x median  (identical tokens: {same})")


if __name__ == "__main__":
    main()
