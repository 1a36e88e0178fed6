"""Small Python pieces of toolkits/gpu_check.sh, one subcommand each (so the script's steps stay one-liners).

    python toolkits/gpu_check_helpers.py gpu-info | tiny-hf DIR [FAMILY] | corpus JSONL | prompts FILE |
                                         completions JSONL N | toy-preferences DIR | rl-prompts DIR | load-hf DIR
"""

from __future__ import annotations

import json
import sys


def gpu_info() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"


def tiny_hf(out_dir: str, family: str = "llama") -> str:
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import make_hf_checkpoint

    config = get_family(family).flavor("tiny")
    make_hf_checkpoint(out_dir, config, seed=0)
    experts = get_family(family).arch_from_hf(config).num_experts
    return (f"{family} tiny: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}"
            + (f", {experts} experts top-{config['num_experts_per_tok']}" if experts else ""))


def corpus(path: str) -> str:
    from megatron_patch.models.tiny import CORPUS

    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    with open(path, "w") as out:
        out.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    return f"{len(lines)} documents"


def prompts(path: str) -> str:
    with open(path, "w") as out:
        out.write("The quick brown fox\nMegatron splits each layer\n")
    return "2 prompts"


def completions(path: str, expected: str) -> str:
    rows = [json.loads(line) for line in open(path)]
    if len(rows) != int(expected) or not all("completion" in row for row in rows):
        raise SystemExit(f"expected {expected} completions, got {rows}")
    # A completion may be empty (greedy decoding can pick EOS first); the characters say how much was generated.
    return f"{len(rows)} completions, {sum(len(row['completion']) for row in rows)} characters"


def toy_preferences(out_dir: str) -> str:
    from megatron_patch.rlhf.examples.toy import write_toy_preferences

    train, valid = write_toy_preferences(out_dir)
    return f"preference pairs: {sum(1 for _ in open(train))} train, {sum(1 for _ in open(valid))} valid"


def rl_prompts(out_dir: str) -> str:
    from pathlib import Path

    from megatron_patch.rlhf.examples.tasks import write_digit_task

    paths = write_digit_task(Path(out_dir), "copy", 4)
    return (f"{sum(1 for _ in open(paths['prompts']))} copy prompts, {sum(1 for _ in open(paths['eval']))} "
            f"held-out")


def load_hf(path: str) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return f"transformers loaded {sum(p.numel() for p in model.parameters())} parameters"


COMMANDS = {"gpu-info": gpu_info, "tiny-hf": tiny_hf, "corpus": corpus, "prompts": prompts,
            "completions": completions, "toy-preferences": toy_preferences, "rl-prompts": rl_prompts, "load-hf": load_hf}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    print(COMMANDS[sys.argv[1]](*sys.argv[2:]))
