"""Offline batch generation: a prompt file in, a jsonl of completions out, on every rank of a TP x PP x DP launch."""

from __future__ import annotations

import sys
from argparse import Namespace


def generate_file(args: Namespace) -> int:
    """Generate a completion for every prompt of ``args.text_generate_input_file``; return the number of prompts.

    Run on every rank (``args`` is the namespace of ``python -m megatron_patch.generate``): each data-parallel group
    takes every DP-th prompt, rank 0 gathers the completions and writes the output file atomically.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..checkpoint.megatron import find_iteration_dir, read_meta
    from ..runtime import init_distributed
    from ..runtime.progress import progress
    from .checks import check_assets, check_checkpoint, check_request, check_stored_tensors
    from .engine import GenerationEngine
    from .loader import load_model
    from .prompts import PromptCodec, read_prompts, write_jsonl_atomic
    from .sampling import SamplingParams

    check_request(args)
    prompts = read_prompts(args.text_generate_input_file, args.prompt_key)
    iter_dir = find_iteration_dir(args.load)
    meta = read_meta(iter_dir)
    check_checkpoint(args, meta)
    check_assets(iter_dir)
    check_stored_tensors(iter_dir)
    codec = PromptCodec(iter_dir / "hf_assets")
    encoded = [codec.encode(p) for p in prompts]
    limit = args.input_len or args.seq_length - args.out_seq_length
    truncated = sum(len(ids) > limit for ids in encoded)
    encoded = [ids[-limit:] for ids in encoded]

    ep = getattr(args, "ep", 1)
    init_distributed(args.tp, args.pp, seed=args.seed, expert_model_parallel_size=ep)
    rank0 = dist.get_rank() == 0
    if truncated and rank0:
        print(f"warning: {truncated} prompt(s) longer than {limit} tokens keep their last {limit} tokens",
              file=sys.stderr)
    loaded = load_model(iter_dir, args.precision, getattr(args, "allow_non_finite", False))
    eos = loaded.eos_token_id()
    if eos is None:
        eos = codec.tokenizer.eod
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    # Expert parallelism: the ranks of an EP group (data-parallel ranks) step together, every rank as many rounds
    # as the largest share needs (an empty one once its prompts are done); the whole world votes, for simplicity.
    lockstep = dist.group.WORLD if ep > 1 else None
    engine = GenerationEngine(loaded.model, loaded.vocab_size, eos_ids, args.seq_length, use_cache=args.use_cache,
                              lockstep_group=lockstep)
    sampling = SamplingParams(args.top_k, args.top_p, args.temperature, args.repetition_penalty, args.seed)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(prompts), dp))
    done: dict[int, str] = {}
    batch = args.micro_batch_size
    rounds = -(-len(range(0, len(prompts), dp)) // batch) if lockstep is not None else -(-len(mine) // batch)
    with progress(total=len(mine), desc="generate", unit="prompt", enabled=rank0) as bar:
        for start in range(0, rounds * batch, batch):
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
