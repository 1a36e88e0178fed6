"""Work run inside spawned local ranks by the generation tests (module level, so ``spawn`` can import it).

Each job loads every requested checkpoint once and runs all the checks for it, so the suite pays the cost of
starting ranks only once per TP size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

PROMPTS = [[5, 17, 99, 3, 250, 11, 7], [42, 8], [300, 301, 302, 1, 9, 77, 12, 13, 14, 15, 16]]
TP1_NEW_TOKENS = 12
TP2_NEW_TOKENS = 8
PENALTY = 1.3
SAMPLING = dict(top_k=0, top_p=0.9, temperature=1.5)
TRAINED_ITERATION = 10


def _engine(loaded, eos, use_cache=True):
    from megatron_patch.generation import GenerationEngine

    return GenerationEngine(loaded.model, loaded.vocab_size, eos, loaded.max_sequence_length, use_cache=use_cache)


def save_like_training(loaded, save_dir: str, iteration: int) -> None:
    """Write the live TP-sharded model as training does: megatron-core torch_dist in ``iter_NNNNNNN/`` with our
    metadata and the tracker file (a "trained" checkpoint, saved at this TP size)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_patch.checkpoint.megatron import ASSETS, META, TRACKER, iteration_dir_name

    iter_dir = Path(save_dir) / iteration_dir_name(iteration)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        iter_dir.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(loaded.model.sharded_state_dict(), str(iter_dir))
    torch.distributed.barrier()
    if rank0:
        meta = dict(loaded.meta, format="torch_dist", iteration=iteration,
                    tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
        (iter_dir / META).write_text(json.dumps(meta, indent=2))
        shutil.copytree(loaded.assets_dir, iter_dir / ASSETS)
        (Path(save_dir) / TRACKER).write_text(str(iteration))
    torch.distributed.barrier()


def tp2_job(checkpoints: dict[str, str], trained_from: str, trained_dir: str, pp2: dict[str, str]) -> dict | None:
    """Greedy, batched, KV-cached generation of every checkpoint at TP=2, then of the ``pp2`` ones at PP=2 (same two
    ranks); rank 0 returns {name: completions} and {"pp2/" + name: completions}.

    Also saves ``trained_from`` at TP=2 as a torch_dist training checkpoint in ``trained_dir``."""
    from megatron_patch.generation import SamplingParams, load_model
    from megatron_patch.runtime import init_distributed

    init_distributed(2, 1)
    results = {}
    for name, path in checkpoints.items():
        loaded = load_model(path)
        results[name] = _engine(loaded, loaded.eos_token_id()).generate(PROMPTS, TP2_NEW_TOKENS, SamplingParams())
        if name == trained_from:
            # Sampling is decided on TP rank 0 and broadcast: it must be reproducible at TP=2 too.
            results[name + "/sampled"] = [
                _engine(loaded, None).generate(PROMPTS, TP2_NEW_TOKENS, SamplingParams(**SAMPLING, seed=5))
                for _ in range(2)
            ]
            save_like_training(loaded, trained_dir, TRAINED_ITERATION)
    init_distributed(1, 2)
    for name, path in pp2.items():
        loaded = load_model(path)
        results["pp2/" + name] = _engine(loaded, loaded.eos_token_id()).generate(PROMPTS, TP2_NEW_TOKENS,
                                                                                 SamplingParams())
    return results if torch.distributed.get_rank() == 0 else None


def tp1_job(checkpoints: dict[str, str], stop_tokens: dict[str, int]) -> dict:
    """Every single-rank check for each checkpoint; returns {check: value} per checkpoint name."""
    from megatron_patch.generation import GenerationError, SamplingParams, load_model
    from megatron_patch.models.builder import build_model
    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1)
    greedy = SamplingParams()
    results = {}
    for name, path in checkpoints.items():
        loaded = load_model(path)
        eos = loaded.eos_token_id()
        cached, uncached = _engine(loaded, eos), _engine(loaded, eos, use_cache=False)
        out = {
            "greedy": cached.generate(PROMPTS, TP1_NEW_TOKENS, greedy),
            "greedy_no_cache": uncached.generate(PROMPTS, TP1_NEW_TOKENS, greedy),
            "greedy_one_by_one": [cached.generate([p], TP1_NEW_TOKENS, greedy)[0] for p in PROMPTS],
            "penalty": cached.generate(PROMPTS, TP1_NEW_TOKENS, SamplingParams(repetition_penalty=PENALTY)),
            "sampled": [cached.generate(PROMPTS, TP1_NEW_TOKENS, SamplingParams(**SAMPLING, seed=s))
                        for s in (5, 5, 6)],
            "sampled_no_cache": uncached.generate(PROMPTS, TP1_NEW_TOKENS, SamplingParams(**SAMPLING, seed=5)),
        }
        if name in stop_tokens:
            out["stopped"] = _engine(loaded, stop_tokens[name]).generate(PROMPTS, TP1_NEW_TOKENS, greedy)
        results[name] = out
        if "refused" not in results:
            from megatron_patch.models.spec import ModelSpec

            arch = ModelSpec.from_meta(loaded.meta).arch
            fresh = build_model(arch, loaded.model.vocab_size, parallel_output=False)
            try:
                _engine(type(loaded)(fresh, loaded.iter_dir, loaded.meta, loaded.vocab_size, 512), eos)
                results["refused"] = ""
            except GenerationError as error:
                results["refused"] = str(error)
    return results
