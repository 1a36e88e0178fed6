"""RLHF on the CPU in a few minutes: a tiny llama learns a digit task with PPO, GRPO or RLOO, shown on prompts it
never saw.

python -m megatron_patch.rlhf.examples.demo [--algo ppo|grpo|rloo] [--task copy|reverse|increment] [--iters N] [--workdir DIR]

The task (``rlhf.examples.tasks``): the prompt is a 4-digit string in the SFT template; the answer is a function of it
(``copy`` by default: the string itself; ``reverse``, ``increment``). The prompts are distinct strings split once
into SFT, RL and held-out sets (no held-out prompt is ever trained on), so a policy scores on the held-out prompts
only by computing the answer; a constant answer scores about 0.
  1. a tiny llama (random init, the tokenizer trained on the shipped corpus) is converted to Megatron;
  2. SFT with the toolkit's finetuning loop on mixed demonstrations: half the answers are the task's, half the lazy
     ``"0000"`` (``--hint``, ``--distractor``). After 400 steps the model does both; greedily it answers most
     held-out prompts with ``"0000"`` (``copy``: held-out exact match 0.23, distinct answers 0.24);
  3. RL with the ``digit_match`` reward (the share of the answer's digits in place; 1 only for the exact answer),
     the SFT model as the reference; held-out greedy answers are scored before the first iteration, every
     ``--eval-interval`` iterations and at the end.
The last line is ``held-out exact_match <before> -> <after>, distinct <d>, kl <kl>``: the share of held-out prompts
answered exactly before and after RL, the share of distinct held-out answers at the end (1.0: every prompt got its
own answer; a policy collapsed onto one string has 1/128) and the KL to the reference in the last iteration.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ...convert.hf_to_mcore import hf_to_mcore
from ...models import get_family
from ...models.tiny import make_hf_checkpoint
from ...runtime import run_on_local_ranks
from ...training.loop import run as run_training
from ..ppo.loop import run as run_rl
from .tasks import DISTRACTORS, task_names, write_digit_task

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
DIGITS = 4
SEQ_LENGTH, NEW_TOKENS = 48, DIGITS + 2  # the SFT prompt template takes 35 tokens with 4 digits; answer + EOS + 1
SFT_ITERS = 400  # both behaviours of the mixed demonstrations learned (the task's and the distractor's)
HINT, DISTRACTOR = 0.5, "constant"  # half the SFT answers are the task's, half "0000"


def make_tiny_checkpoint(out: Path, seed: int = 0) -> str:
    make_hf_checkpoint(out / "hf", {**get_family("llama").flavor("tiny"), **TINY}, seed=seed)
    hf_to_mcore(out / "hf", out / "mcore")
    return str(out / "mcore")


def sft_config(load: str, data: str, save: str, iters: int = SFT_ITERS) -> dict:
    return dict(mode="finetune", load=load, train_data_path=data, save=save, seq_length=SEQ_LENGTH,
                micro_batch_size=32, global_batch_size=32, train_iters=iters, lr=5e-3, lr_decay_style="constant",
                weight_decay=0.0, log_interval=50)


def rl_configs(algo: str, load: str, prompts: str, iters: int, save: str | None = None, eval_prompts: str | None = None,
               **rl_over) -> tuple[dict, dict]:
    """(training flags, RL flags) of the demo's RL stage."""
    group = algo != "ppo"
    cfg = dict(load=load, save=save, seq_length=SEQ_LENGTH, micro_batch_size=16, global_batch_size=8 if group else 32,
               train_iters=iters, lr=5e-4, lr_decay_style="constant", weight_decay=0.0, log_interval=5)
    rl = dict(algo=algo, prompt_data_path=prompts, eval_prompt_data_path=eval_prompts, reward="digit_match",
              max_new_tokens=NEW_TOKENS, n_samples_per_prompt=8 if group else 1, ppo_mini_batches=2, ppo_epochs=1,
              kl_coef=0.01, critic_lr=5e-4, lam=0.95, temperature=0.7)
    rl.update(rl_over)
    return cfg, rl


def _sft_worker(cfg: dict) -> list:
    return run_training(cfg, quiet=False)


def _rl_worker(cfg: dict, rl: dict) -> dict:
    return run_rl(cfg, rl)


def summary(result: dict) -> str:
    """``held-out exact_match <before> -> <after>, distinct <d>, kl <kl>`` of an RL run's result."""
    (_, before), (_, after) = result["evals"][0], result["evals"][-1]
    kl = result["history"][-1][1]["actor/kl_sum"]
    return (f"held-out exact_match {before['eval/exact_match']:.3f} -> {after['eval/exact_match']:.3f}, distinct "
            f"{after['eval/distinct']:.2f}, kl {kl:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.examples.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("ppo", "grpo", "rloo"), default="grpo")
    parser.add_argument("--task", choices=task_names(), default="copy")
    parser.add_argument("--iters", type=int, default=20, help="RL iterations (default: 20)")
    parser.add_argument("--sft-iters", type=int, default=SFT_ITERS, help=f"SFT warm-up steps (default: {SFT_ITERS})")
    parser.add_argument("--hint", type=float, default=HINT,
                        help=f"share of SFT answers that are the task's (default: {HINT})")
    parser.add_argument("--distractor", choices=DISTRACTORS.names(), default=DISTRACTOR,
                        help=f"what the other SFT answers are (default: {DISTRACTOR})")
    parser.add_argument("--eval-interval", type=int, default=10, help="held-out evaluation interval (default: 10)")
    parser.add_argument("--workdir", help="keep the data and checkpoints here; an SFT checkpoint already there is "
                                          "reused (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.distractor == args.task:
        parser.error("--distractor must differ from --task")
    if not 0.0 < args.hint <= 1.0:
        parser.error("--hint must be in (0, 1]")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        paths = write_digit_task(work / "data", args.task, DIGITS, hint=args.hint, distractor=args.distractor)
        sft = work / f"sft-{args.task}-{args.distractor}-{args.hint}"
        if not (sft / "latest_checkpointed_iteration.txt").is_file():
            base = str(work / "mcore") if (work / "mcore").is_dir() else make_tiny_checkpoint(work)
            run_on_local_ranks(_sft_worker, 1, sft_config(base, paths["sft"], str(sft), args.sft_iters))
        cfg, rl = rl_configs(args.algo, str(sft), paths["prompts"], args.iters, None, paths["eval"])
        cfg["eval_interval"] = args.eval_interval
        result = run_on_local_ranks(_rl_worker, 1, cfg, rl)[0]
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
