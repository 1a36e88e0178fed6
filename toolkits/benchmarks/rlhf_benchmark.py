"""megatron-patch's RLHF trainers side by side with TRL's on the same tiny model, data and batch shape (CPU).

python toolkits/benchmarks/rlhf_benchmark.py [--steps 8] [--threads 1] [--only reward,dpo,grpo]

Needs TRL (``pip install -e .[bench]``). One tiny llama (the demo's: 2 layers, hidden 64, vocabulary 512, the
tokenizer trained on the shipped corpus) is written once as HF and converted to Megatron; both sides start from
the same weights. Each trainer runs in its own fresh process, ours and TRL's one after the other, with the same
number of torch threads:

- reward model: the toy preference pairs (``rlhf.toy``), 16 pairs per optimizer step in one micro-batch, 32 tokens;
  TRL ``RewardTrainer`` (``AutoModelForSequenceClassification``, one label);
- DPO: the same pairs and shape, beta 0.1, the reference's log-probs computed every step on both sides; TRL
  ``DPOTrainer``;
- GRPO: the count-up prompts of ``rlhf.demo`` (35 tokens), 8 prompts x 4 samples of up to 8 tokens at
  temperature 1, the count-up reward, KL coefficient 0.04 (so both sides run the reference), one optimizer step
  per rollout over two micro-batches of 16; TRL ``GRPOTrainer`` (transformers' ``generate`` with its KV cache).
  The split: *rollout* = generation + rewards + reference (and, ours, old-policy) log-probs; *training* = the rest.

TRL 1.x has no PPO trainer (``PPOTrainer`` left the package), so PPO is not compared.
Step time: the mean over steps 2..N (the first step carries one-off warm-up), wall (``step``) and the process's
CPU time (``cpu``; steadier on a shared host; not measured for ours' GRPO, whose loop times itself). Memory: the process's peak resident
set size (``ru_maxrss``), whole and as the rise during training (peak minus the resident size when training
starts), both as ours / TRL ratios (< 1: ours is faster / smaller).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

SEQ_LENGTH = 32  # preference pairs (prompt + response); GRPO uses the demo's 48
PAIRS_PER_STEP = 16
DPO_BETA = 0.1
GRPO = dict(prompts=8, samples=4, new_tokens=8, micro_batch=16, kl_coef=0.04)
LR = 1e-4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _mean_step(stamps: list[float]) -> float:
    """Mean seconds per step over steps 2..N from the end time of each step."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _clock() -> tuple[float, float]:
    """(wall, this process's CPU time): on a shared host the CPU time is the steadier of the two."""
    return time.perf_counter(), time.process_time()


def _step_times(stamps: list[tuple[float, float]]) -> dict:
    return {"step": _mean_step([wall for wall, _ in stamps]), "cpu": _mean_step([cpu for _, cpu in stamps])}


# ---- ours (run_on_local_ranks workers: each in a fresh process with torchrun's environment) ----

def _timed_optimizer(optimizer, stamps: list[float]) -> None:
    """Record the end of every optimizer step (one per training step)."""
    step = optimizer.step

    def timed_step(*args, **kwargs):
        result = step(*args, **kwargs)
        stamps.append(_clock())
        return result

    optimizer.step = timed_step


def ours_reward(cfg: dict, threads: int) -> dict:
    import torch

    from megatron_patch.rlhf.preference.train_reward_model import build_run, train
    from megatron_patch.training.arguments import TrainConfig

    torch.set_num_threads(threads)
    run = build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), quiet=True)
    stamps, start_rss = [], _rss_mb()
    _timed_optimizer(run.trained.optimizer, stamps)
    train(run)
    return {**_step_times(stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - start_rss}


def ours_dpo(cfg: dict, threads: int) -> dict:
    import torch

    from megatron_patch.rlhf.preference.dpo import build_run, train
    from megatron_patch.training.arguments import TrainConfig

    torch.set_num_threads(threads)
    run = build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), DPO_BETA, quiet=True)
    stamps, start_rss = [], _rss_mb()
    _timed_optimizer(run.trained.optimizer, stamps)
    train(run)
    return {**_step_times(stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - start_rss}


def ours_grpo(cfg: dict, rl: dict, threads: int) -> dict:
    import torch

    from megatron_patch.rlhf.ppo.loop import run

    torch.set_num_threads(threads)
    start_rss = _rss_mb()  # before the build: ours builds and trains in one call
    history = run(cfg, rl, quiet=True)["history"][1:]  # the first iteration carries the warm-up
    rollout = sum(m["time/generation"] + m["time/experience"] for _, m in history) / len(history)
    training = sum(m["time/training"] for _, m in history) / len(history)
    return {"step": rollout + training, "rollout": rollout, "training": training, "peak_mb": _rss_mb(),
            "rise_mb": _rss_mb() - start_rss, "reward": history[-1][1]["reward/mean"]}


# ---- TRL (plain spawned processes) ----

def _trl_args(config_cls, out: str, steps: int, threads: int, **extra):
    import torch

    torch.set_num_threads(threads)
    return config_cls(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                      weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=steps,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.start_rss = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_rss = _rss_mb()

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(_clock())

    return StepClock()


def _pairs_dataset(path: str):
    import json

    from datasets import Dataset

    return Dataset.from_list([json.loads(line) for line in Path(path).read_text().splitlines() if line])


def trl_reward(hf: str, data: str, out: str, steps: int, threads: int) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = _trl_args(RewardConfig, out, steps, threads, per_device_train_batch_size=PAIRS_PER_STEP,
                     max_length=SEQ_LENGTH)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    clock = _step_clock()
    RewardTrainer(model=model, args=args, train_dataset=_pairs_dataset(data), processing_class=tokenizer,
                  callbacks=[clock]).train()
    return {**_step_times(clock.stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - clock.start_rss}


def trl_dpo(hf: str, data: str, out: str, steps: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = _trl_args(DPOConfig, out, steps, threads, per_device_train_batch_size=PAIRS_PER_STEP,
                     max_length=SEQ_LENGTH, beta=DPO_BETA)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    clock = _step_clock()
    DPOTrainer(model=model, args=args, train_dataset=_pairs_dataset(data), processing_class=tokenizer,
               callbacks=[clock]).train()
    return {**_step_times(clock.stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - clock.start_rss}


def _count_up_text_reward(prompts, completions, **kwargs) -> list[float]:
    """The demo's count-up reward on text: the fraction of the count's next digits the completion gets right."""
    import re

    from megatron_patch.rlhf.ppo.rewards import count_up_target

    rewards = []
    for prompt, completion in zip(prompts, completions):
        instruction = re.findall(r"\d{4}", prompt)[0]
        target = count_up_target(instruction, GRPO["new_tokens"])
        rewards.append(sum(a == b for a, b in zip(completion.strip(), target)) / len(target))
    return rewards


def trl_grpo(hf: str, prompts: str, out: str, steps: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    accumulation = GRPO["prompts"] * GRPO["samples"] // GRPO["micro_batch"]
    args = _trl_args(GRPOConfig, out, steps, threads, per_device_train_batch_size=GRPO["micro_batch"],
                     gradient_accumulation_steps=accumulation, num_generations=GRPO["samples"],
                     max_completion_length=GRPO["new_tokens"], temperature=1.0, beta=GRPO["kl_coef"],
                     num_iterations=1)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    clock = _step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=_count_up_text_reward, args=args,
                          train_dataset=_pairs_dataset(prompts), processing_class=tokenizer, callbacks=[clock])
    rollout_times = []
    generate_and_score = trainer._generate_and_score_completions  # rollout: generate, reward, reference log-probs

    def timed(*a, **k):
        begin = time.perf_counter()
        result = generate_and_score(*a, **k)
        rollout_times.append(time.perf_counter() - begin)
        return result

    trainer._generate_and_score_completions = timed
    trainer.train()
    times = _step_times(clock.stamps)
    rollout = sum(rollout_times[1:]) / len(rollout_times[1:])
    return {**times, "rollout": rollout, "training": times["step"] - rollout, "peak_mb": _rss_mb(),
            "rise_mb": _rss_mb() - clock.start_rss}


def _in_fresh_process(fn, *args):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _ratios(name: str, ours: dict, trl: dict) -> None:
    keys = [k for k in ("step", "cpu", "rollout", "training") if k in ours and k in trl]
    times = ", ".join(f"{k} {ours[k]:.3f}s vs {trl[k]:.3f}s (x{ours[k] / trl[k]:.2f})" for k in keys)
    print(f"{name:12s} ours/TRL: {times}; peak RSS {ours['peak_mb']:.0f} vs {trl['peak_mb']:.0f} MB "
          f"(x{ours['peak_mb'] / trl['peak_mb']:.2f}), rise in training {ours['rise_mb']:.0f} vs "
          f"{trl['rise_mb']:.0f} MB", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (>= 3; default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default: 1)")
    parser.add_argument("--only", default="reward,dpo,grpo", help="comma-separated subset of reward,dpo,grpo")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first step is not timed)")
    wanted = set(args.only.split(","))
    if wanted - {"reward", "dpo", "grpo"}:
        parser.error(f"--only: unknown {', '.join(sorted(wanted - {'reward', 'dpo', 'grpo'}))}")
    try:
        import trl
    except ImportError:
        sys.exit("error: TRL is not installed (pip install -e .[bench])")

    from megatron_patch.rlhf.examples.demo import make_tiny_checkpoint, rl_configs, write_task
    from megatron_patch.rlhf.examples.toy import write_toy_preferences
    from megatron_patch.runtime import run_on_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mcore, hf = make_tiny_checkpoint(work), str(work / "hf")
        pairs, _ = write_toy_preferences(work / "pairs")
        task = write_task(work / "task")
        print(f"TRL {trl.__version__}; tiny llama, {args.steps} steps, {args.threads} thread(s), CPU", flush=True)
        pair_cfg = dict(load=mcore, train_data_path=pairs, seq_length=SEQ_LENGTH, micro_batch_size=PAIRS_PER_STEP,
                        global_batch_size=PAIRS_PER_STEP, train_iters=args.steps, lr=LR, lr_decay_style="constant",
                        weight_decay=0.0, log_interval=args.steps)
        if "reward" in wanted:
            ours = run_on_local_ranks(ours_reward, 1, pair_cfg, args.threads)[0]
            _ratios("reward model", ours, _in_fresh_process(trl_reward, hf, pairs, str(work / "t_rm"), args.steps,
                                                            args.threads))
        if "dpo" in wanted:
            ours = run_on_local_ranks(ours_dpo, 1, pair_cfg, args.threads)[0]
            _ratios("DPO", ours, _in_fresh_process(trl_dpo, hf, pairs, str(work / "t_dpo"), args.steps,
                                                   args.threads))
        if "grpo" in wanted:
            cfg, rl = rl_configs("grpo", mcore, task["prompts"], args.steps)
            cfg.update(lr=LR, log_interval=args.steps, micro_batch_size=GRPO["micro_batch"],
                       global_batch_size=GRPO["prompts"])
            rl.update(n_samples_per_prompt=GRPO["samples"], ppo_mini_batches=1, ppo_epochs=1,
                      kl_coef=GRPO["kl_coef"])
            ours = run_on_local_ranks(ours_grpo, 1, cfg, rl, args.threads)[0]
            _ratios("GRPO", ours, _in_fresh_process(trl_grpo, hf, task["prompts"], str(work / "t_grpo"), args.steps,
                                                    args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
