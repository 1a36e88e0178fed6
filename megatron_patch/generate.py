"""python -m megatron_patch.generate --load CKPT --text-generate-input-file IN --text-generate-output-file OUT [...]

Offline batch generation from a converted or trained megatron-patch checkpoint (torch_dist or legacy, saved at any
TP x PP, run at any TP x PP). Launch a multiple of TP x PP processes, e.g.
  torchrun --nproc-per-node 2 -m megatron_patch.generate --tensor-model-parallel-size 2 --load CKPT ...
With more processes than TP x PP, each data-parallel group generates its share of the prompts.

Input: a text file with one prompt per line, or a .jsonl file whose objects carry the prompt under
``--prompt-key`` (default ``prompt``). Output: a .jsonl file with one {"prompt", "completion"} object per prompt,
in input order, written on rank 0 to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    from .runtime.noise import add_verbose_flag

    p = argparse.ArgumentParser(prog="python -m megatron_patch.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (or one iteration directory)")
    p.add_argument("--model-name", default=None, help="expected model family (checked against the checkpoint)")
    p.add_argument("--model-size", default=None, help="expected size preset of the family (checked against the "
                                                      "checkpoint's layers / hidden size / heads)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1, help="prompts generated together")
    p.add_argument("--seq-length", type=int, required=True, help="longest prompt + completion, in tokens")
    p.add_argument("--max-padding-length", type=int, default=None,
                   help="accepted for argument-list compatibility with the finetuning scripts; must be <= "
                        "--seq-length. Generation batches prompts of different lengths without padding them")
    p.add_argument("--extra-vocab-size", type=int, default=None,
                   help="tokens added at conversion; checked against the checkpoint when given")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy; 0 disables the top-k filter")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass; 0 disables it")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables it")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--input-len", type=int, default=None,
                   help="longest prompt in tokens; longer prompts keep their last --input-len tokens")
    p.add_argument("--out-seq-length", type=int, required=True, help="most new tokens per prompt")
    p.add_argument("--text-generate-input-file", required=True)
    p.add_argument("--text-generate-output-file", required=True)
    p.add_argument("--prompt-key", default="prompt", help="field holding the prompt in a .jsonl input")
    p.add_argument("--no-kv-cache", dest="use_cache", action="store_false",
                   help="re-run the whole prefix every step (slow; for checking the cache)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load weights holding NaN/Inf (warn once) instead of refusing the checkpoint")
    add_verbose_flag(p)
    return p


def check_args(args) -> None:
    """Everything that can be checked before a model is built; one line naming the flag per problem."""
    from .generation import SamplingParams

    for flag in ("tp", "pp", "micro_batch_size", "seq_length", "out_seq_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (args.tp * args.pp):
        raise ValueError(f"{world} processes were launched for TP x PP = {args.tp} x {args.pp}; launch a multiple "
                         f"of TP x PP processes (torchrun --nproc-per-node {args.tp * args.pp})")
    if args.input_len is not None:
        if args.input_len < 1:
            raise ValueError(f"--input-len must be >= 1 (got {args.input_len})")
        if args.input_len + args.out_seq_length > args.seq_length:
            raise ValueError(f"--input-len {args.input_len} + --out-seq-length {args.out_seq_length} exceeds "
                             f"--seq-length {args.seq_length}")
    elif args.out_seq_length >= args.seq_length:
        raise ValueError(f"--out-seq-length {args.out_seq_length} leaves no room for a prompt in --seq-length "
                         f"{args.seq_length}")
    if args.max_padding_length is not None and not 1 <= args.max_padding_length <= args.seq_length:
        raise ValueError(f"--max-padding-length must be in [1, --seq-length {args.seq_length}] "
                         f"(got {args.max_padding_length})")
    if args.extra_vocab_size is not None and args.extra_vocab_size < 0:
        raise ValueError(f"--extra-vocab-size must be >= 0 (got {args.extra_vocab_size})")
    SamplingParams(args.top_k, args.top_p, args.temperature, args.repetition_penalty, args.seed)
    source = Path(args.text_generate_input_file)
    if not source.is_file():
        raise FileNotFoundError(f"--text-generate-input-file {source} does not exist")
    target = Path(args.text_generate_output_file)
    if not target.absolute().parent.is_dir():
        raise FileNotFoundError(f"the directory of --text-generate-output-file {target} does not exist")
    if target.is_dir():
        raise ValueError(f"--text-generate-output-file {target} is a directory")
    from .checkpoint.paths import check_disjoint

    check_disjoint(source, target, "--text-generate-input-file", "--text-generate-output-file")
    check_disjoint(args.load, target, "--load", "--text-generate-output-file")


def read_prompts(path: str | os.PathLike, prompt_key: str = "prompt") -> list[str]:
    """Prompts from a .jsonl file (``prompt_key`` of each object) or a text file (one per non-empty line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = []
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(prompt_key), str):
                raise ValueError(f"{path}:{number} has no string field '{prompt_key}' (set --prompt-key)")
            prompts.append(record[prompt_key])
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    from .checkpoint.atomic import apply_umask_modes

    path = Path(path).absolute()
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        apply_umask_modes(temp)  # readable as a plain open() would leave it, not mkstemp's 0600
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)  # gone already after the rename; removed on any error or interrupt


class PromptCodec:
    """Text <-> ids with the checkpoint's own tokenizer (``hf_assets/``), as its HF original would encode them:
    a HF tokenizer adds the special tokens its config asks for (e.g. llama's BOS)."""

    def __init__(self, assets_dir: Path):
        from .data.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(assets_dir)
        self.hf = getattr(self.tokenizer, "tok", None)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text) if self.hf is not None else self.tokenizer.encode(text)

    def decode(self, ids: list[int], eos_ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([t for t in ids if t not in eos_ids])


def check_checkpoint(args, meta: dict) -> None:
    from .models import get_family

    family = get_family(meta["family"])
    if args.model_name and args.model_name != family.name:
        raise ValueError(f"the checkpoint holds a '{family.name}' model, not '{args.model_name}'")
    if args.model_size:
        preset = family.arch_from_hf(family.flavor(args.model_size))
        actual = family.arch_from_hf(meta["hf_config"])
        fields = ("num_layers", "hidden_size", "num_attention_heads")
        if any(getattr(preset, f) != getattr(actual, f) for f in fields):
            shape = "/".join(str(getattr(actual, f)) for f in fields)
            raise ValueError(f"MODEL_SIZE {args.model_size} does not match the checkpoint (layers/hidden/heads "
                             f"{shape}); pass the size the checkpoint was converted from")
    if args.extra_vocab_size is not None and args.extra_vocab_size != meta["extra_vocab_size"]:
        raise ValueError(f"--extra-vocab-size {args.extra_vocab_size} differs from the checkpoint's "
                         f"{meta['extra_vocab_size']} (the value it was converted with)")
    arch = family.arch_from_hf(meta["hf_config"])
    arch.check_parallel(args.tp, args.pp)
    max_positions = arch.max_position_embeddings
    if args.seq_length > max_positions:
        raise ValueError(f"--seq-length {args.seq_length} exceeds the model's {max_positions} positions")


def generate_file(args) -> int:
    """Run on every rank; each data-parallel group takes every DP-th prompt, rank 0 writes the output. Returns the
    number of prompts."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from tqdm import tqdm

    from .generation import GenerationEngine, SamplingParams, load_model
    from .models.checkpoint import Checkpoint
    from .runtime import init_distributed

    check_args(args)
    prompts = read_prompts(args.text_generate_input_file, args.prompt_key)
    ckpt = Checkpoint.open(args.load)
    iter_dir, meta = ckpt.iter_dir, ckpt.meta
    check_checkpoint(args, meta)
    codec = PromptCodec(iter_dir / "hf_assets")
    encoded = [codec.encode(p) for p in prompts]
    limit = args.input_len or args.seq_length - args.out_seq_length
    truncated = sum(len(ids) > limit for ids in encoded)
    encoded = [ids[-limit:] for ids in encoded]

    init_distributed(args.tp, args.pp, seed=args.seed)
    rank0 = dist.get_rank() == 0
    if truncated and rank0:
        print(f"warning: {truncated} prompt(s) longer than {limit} tokens keep their last {limit} tokens",
              file=sys.stderr)
    loaded = load_model(iter_dir, args.precision, args.allow_non_finite)
    eos = loaded.eos_token_id()
    if eos is None:
        eos = codec.tokenizer.eod
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    engine = GenerationEngine(loaded.model, loaded.vocab_size, eos_ids, args.seq_length, use_cache=args.use_cache)
    sampling = SamplingParams(args.top_k, args.top_p, args.temperature, args.repetition_penalty, args.seed)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(prompts), dp))
    done: dict[int, str] = {}
    batch = args.micro_batch_size
    with tqdm(total=len(mine), desc="generate", unit="prompt", disable=None if rank0 else True) as bar:
        for start in range(0, len(mine), batch):
            indices = mine[start : start + batch]
            completions = engine.generate([encoded[i] for i in indices], args.out_seq_length, sampling)
            done.update({i: codec.decode(ids, eos_ids) for i, ids in zip(indices, completions)})
            bar.update(len(indices))
    if dp > 1:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, done)
        for share in shares:
            done.update(share)
    if rank0:
        rows = [{"prompt": prompt, "completion": done[i]} for i, prompt in enumerate(prompts)]
        write_jsonl_atomic(args.text_generate_output_file, rows)
        print(f"wrote {len(rows)} completions to {args.text_generate_output_file}")
    return len(prompts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.noise import quiet_third_party

    quiet_third_party(args.verbose or None)
    from .runtime import destroy_distributed
    from .runtime.errors import run_reporting_errors

    def generate() -> None:
        generate_file(args)

    return run_reporting_errors(generate, cleanup=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
