"""RLHF on the CPU in a few minutes: a tiny llama learns to count with PPO (or GRPO).

python -m megatron_patch.rlhf.demo [--algo ppo|grpo] [--iters N] [--workdir DIR]

The task: the prompt is four digits counting up (``"3456"``, wrapped in the SFT prompt template); the answer
should continue the count (``"78901234"``). The reward (``rlhf.rewards`` ``count_up``) is dense: the fraction of the
response's characters that match the count position by position.
  1. a tiny llama (random init, the tokenizer trained on the shipped corpus) is converted to Megatron;
  2. SFT warm-up with the toolkit's finetuning loop on answers that follow the count only 30% of the time (random
     digits otherwise): the model learns the format (eight digits, then EOS) and a weak prior, and starts at a
     low reward;
  3. PPO (critic from the SFT backbone with a fresh value head) or GRPO (8 samples per prompt) with the count
     reward as a Python function; the reference is the SFT model.
The last line is ``reward <start> -> <end>, kl <kl>``: mean reward of the first and of the last iterations and
the KL to the reference at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from ..data.sft import PROMPT
from .rewards import count_up_target

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
SEQ_LENGTH, NEW_TOKENS = 48, 8  # the SFT prompt template takes 35 tokens
# The SFT answers follow the count this often (else a random digit): the warm-up gives the model a weak prior,
# which RL then has to find and strengthen from the reward alone.
HINT = 0.3


def counting_prompt(rng: random.Random) -> str:
    first = rng.randrange(10)
    return "".join(str((first + k) % 10) for k in range(4))


def sft_answer(prompt: str, rng: random.Random, hint: float) -> str:
    """Eight digits, each the count's with probability ``hint``, else a random digit."""
    target = count_up_target(prompt, NEW_TOKENS)
    return "".join(digit if rng.random() < hint else str(rng.randrange(10)) for digit in target)


def write_task(out: Path, seed: int = 0, hint: float = HINT) -> dict[str, str]:
    """SFT data (answers that count only now and then), RL prompts (the same template) and PTX text; returns their
    paths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / f"{name}.jsonl") for name in ("sft", "prompts", "ptx")}
    with open(paths["sft"], "w") as handle:
        for _ in range(256):
            prompt = counting_prompt(rng)
            handle.write(json.dumps({"instruction": prompt, "output": sft_answer(prompt, rng, hint)}) + "\n")
    with open(paths["prompts"], "w") as handle:
        for _ in range(64):
            handle.write(json.dumps({"prompt": PROMPT.format(instruction=counting_prompt(rng))}) + "\n")
    with open(paths["ptx"], "w") as handle:
        for _ in range(64):
            handle.write(json.dumps({"text": PROMPT.format(instruction=counting_prompt(rng))}) + "\n")
    return paths


def make_tiny_checkpoint(out: Path, seed: int = 0) -> str:
    from ..convert.hf_to_mcore import hf_to_mcore
    from ..models import get_family
    from ..models.tiny import make_hf_checkpoint

    make_hf_checkpoint(out / "hf", {**get_family("llama").flavor("tiny"), **TINY}, seed=seed)
    hf_to_mcore(out / "hf", out / "mcore")
    return str(out / "mcore")


def sft_config(load: str, data: str, save: str, iters: int = 60) -> dict:
    return dict(mode="finetune", load=load, train_data_path=data, save=save, seq_length=SEQ_LENGTH,
                micro_batch_size=16, global_batch_size=16, train_iters=iters, lr=2e-3, lr_decay_style="constant",
                weight_decay=0.0, log_interval=20)


def rl_configs(algo: str, load: str, prompts: str, iters: int, save: str | None = None, **rl_over) -> tuple:
    """(training flags, RL flags) of the demo's RL stage."""
    grpo = algo == "grpo"
    cfg = dict(load=load, save=save, seq_length=SEQ_LENGTH, micro_batch_size=16, global_batch_size=8 if grpo else 32,
               train_iters=iters, lr=5e-3, lr_decay_style="constant", weight_decay=0.0, log_interval=5)
    rl = dict(algo=algo, prompt_data_path=prompts, reward_fn="count_up", max_new_tokens=NEW_TOKENS,
              n_samples_per_prompt=4 if grpo else 1, ppo_mini_batches=2, ppo_epochs=2, kl_coef=0.01,
              critic_lr=5e-3, lam=0.95, temperature=1.0, **rl_over)
    return cfg, rl


def _sft_worker(cfg: dict) -> list:
    from ..training.loop import run

    return run(cfg, quiet=False)


def _rl_worker(cfg: dict, rl: dict) -> dict:
    from .ppo import run

    return run(cfg, rl)


def summary(history: list, window: int = 3) -> tuple[float, float, float]:
    """(mean reward over the first ``window`` iterations, over the last ``window``, the last iteration's KL)."""
    rewards = [m["reward/mean"] for _, m in history]
    start, end = sum(rewards[:window]) / len(rewards[:window]), sum(rewards[-window:]) / len(rewards[-window:])
    return start, end, history[-1][1]["actor/kl_sum"]


def main(argv=None) -> int:
    from ..runtime import run_on_local_ranks

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("ppo", "grpo"), default="ppo")
    parser.add_argument("--iters", type=int, default=40, help="RL iterations (default: 40)")
    parser.add_argument("--sft-iters", type=int, default=60, help="SFT warm-up steps (default: 60)")
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        paths = write_task(work / "data")
        base = make_tiny_checkpoint(work)
        run_on_local_ranks(_sft_worker, 1, sft_config(base, paths["sft"], str(work / "sft"), args.sft_iters))
        cfg, rl = rl_configs(args.algo, str(work / "sft"), paths["prompts"], args.iters, str(work / args.algo))
        history = run_on_local_ranks(_rl_worker, 1, cfg, rl)[0]["history"]
    start, end, kl = summary(history)
    print(f"reward {start:.3f} -> {end:.3f}, kl {kl:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
