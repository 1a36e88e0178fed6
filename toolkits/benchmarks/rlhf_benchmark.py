"""megatron-patch's RLHF trainers side by side with TRL's on the same model, data and settings (CPU).

python toolkits/benchmarks/rlhf_benchmark.py [--only reward,dpo,grpo] [--steps N] [--threads 1] [--hf DIR]
    [--workdir DIR]

Needs TRL (``pip install -e .[bench]``; a venv with ``--system-site-packages`` keeps the system's transformers).
Each trainer runs in its own fresh process, ours and TRL's one after the other, with the same number of torch
threads.

- reward model: the demo's tiny llama (2 layers, hidden 64, vocabulary 512, the tokenizer trained on the shipped
  corpus; written once as HF and converted, so both sides start from the same weights) on the toy preference pairs
  (``rlhf.examples.toy``), 16 pairs per optimizer step in one micro-batch, 32 tokens; TRL ``RewardTrainer``
  (``AutoModelForSequenceClassification``, one label). ``--steps`` optimizer steps (default 8);
- DPO: the same model, pairs and shape, beta 0.1, the reference's log-probs computed every step on both sides; TRL
  ``DPOTrainer``;
- GRPO: the demo's digit task and RL settings (``rlhf.examples.demo.rl_configs``): the ``copy`` task's RL prompts
  (``prompts.jsonl`` of ``write_digit_task``), the ``digit_match`` reward (our reward function, called by TRL on
  the decoded completion and the line's ``answer``), 8 prompts x 8 samples of at most 6 new tokens at temperature
  0.7, KL coefficient 0.01 as a k3 KL loss, clip 0.2, token-mean loss over each optimizer step's tokens, 2
  optimizer steps per rollout of 32 samples each in micro-batches of 16, Adam (lr 5e-4 constant, betas 0.9/0.95,
  eps 1e-8, no weight decay, gradient clipping 1.0), fp32, no activation recompute, ``--steps`` RL iterations
  (default 20; TRL: ``--steps x 2`` optimizer steps, one generation per 2). TRL ``GRPOTrainer`` (transformers'
  ``generate`` with its KV cache). The start: without ``--hf``, the demo's tiny llama after the demo's SFT (400
  steps on mixed demonstrations: half the task's answer, half "0000"), exported to HF for TRL; with ``--hf DIR``
  (any HF llama / qwen directory with a tokenizer), that model as is (converted with hf2mcore for ours). Both
  trained models (ours exported with mcore2hf) and the start are scored by one piece of code: greedy answers
  (transformers ``generate``, prompts batched by token length so nothing is padded) to the held-out prompts
  (``eval.jsonl``, never trained on), exact match and ``digit_match``; ours' own in-loop held-out numbers (its
  generation engine) are printed next to them as a cross-check.

TRL 1.x has no PPO trainer (``PPOTrainer`` left the package), so PPO is not compared.
Step time: the mean over steps (GRPO: iterations) 2..N (the first carries one-off warm-up), wall (``step``) and the
process's CPU time (``cpu``; steadier on a shared host). GRPO's split: *rollout* = generation + rewards + reference
and old-policy log-probs; *training* = the rest. Memory: the process's peak resident set size (``ru_maxrss``), whole
and as the rise during training (peak minus the resident size when training starts), both as ours / TRL ratios
(< 1: ours is faster / smaller).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.rlhf.examples.demo import (
    DIGITS,
    DISTRACTOR,
    HINT,
    SFT_ITERS,
    make_tiny_checkpoint,
    rl_configs,
    sft_config,
)
from megatron_patch.rlhf.examples.tasks import write_digit_task
from megatron_patch.rlhf.examples.toy import write_toy_preferences
from megatron_patch.rlhf.ppo import loop as rl_loop
from megatron_patch.rlhf.ppo.config import RLConfig
from megatron_patch.rlhf.ppo.rewards import digit_match_score
from megatron_patch.rlhf.preference import dpo, train_reward_model
from megatron_patch.runtime import run_on_local_ranks
from megatron_patch.training.arguments import TrainConfig
from megatron_patch.training.loop import run as run_training

SEQ_LENGTH = 32  # preference pairs (prompt + response); GRPO uses the demo's 48
PAIRS_PER_STEP = 16
DPO_BETA = 0.1
LR = 1e-4
GRPO_TASK = "copy"
DEFAULT_STEPS = {"reward": 8, "dpo": 8, "grpo": 20}


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


def _in_fresh_process(fn, *args):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _trl():
    """TRL, imported where it is used: an optional dependency (the ``bench`` extra), absent from the test suite."""
    import trl

    return trl


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
    torch.set_num_threads(threads)
    run = train_reward_model.build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), quiet=True)
    stamps, start_rss = [], _rss_mb()
    _timed_optimizer(run.trained.optimizer, stamps)
    train_reward_model.train(run)
    return {**_step_times(stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - start_rss}


def ours_dpo(cfg: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    run = dpo.build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), DPO_BETA, quiet=True)
    stamps, start_rss = [], _rss_mb()
    _timed_optimizer(run.trained.optimizer, stamps)
    dpo.train(run)
    return {**_step_times(stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - start_rss}


def _sft_worker(cfg: dict) -> None:
    run_training(cfg, quiet=True)


def ours_grpo(cfg: dict, rl: dict, threads: int) -> dict:
    """Our GRPO loop (``rlhf.ppo.loop.run``, saving to ``cfg["save"]``): step times, memory, its held-out evals."""
    torch.set_num_threads(threads)
    stamps, start_rss = [], _rss_mb()  # before the build: ours builds and trains in one call
    iteration = rl_loop.iteration

    def timed_iteration(run):  # the loop calls the module's ``iteration`` once per RL iteration
        metrics = iteration(run)
        stamps.append(_clock())
        return metrics

    rl_loop.iteration = timed_iteration
    try:
        result = rl_loop.run(cfg, rl, quiet=True)
    finally:
        rl_loop.iteration = iteration
    history = [metrics for _, metrics in result["history"][1:]]  # the first iteration carries the warm-up
    rollout = sum(m["time/generation"] + m["time/experience"] for m in history) / len(history)
    training = sum(m["time/training"] for m in history) / len(history)
    return {**_step_times(stamps), "rollout": rollout, "training": training, "peak_mb": _rss_mb(),
            "rise_mb": _rss_mb() - start_rss, "evals": result["evals"]}


# ---- TRL (plain spawned processes) ----

def _trl_args(config_cls, out: str, steps: int, threads: int, **extra):
    torch.set_num_threads(threads)
    return config_cls(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                      weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=steps,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


class StepClock(TrainerCallback):
    """The end time (wall, CPU) of every optimizer step and the resident size when training starts."""

    def __init__(self):
        self.stamps, self.start_rss = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_rss = _rss_mb()

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(_clock())


def _dataset(path: str):
    from datasets import Dataset  # comes with TRL (the bench extra), like TRL itself

    return Dataset.from_list(_jsonl(path))


def trl_reward(hf: str, data: str, out: str, steps: int, threads: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    trl = _trl()
    args = _trl_args(trl.RewardConfig, out, steps, threads, per_device_train_batch_size=PAIRS_PER_STEP,
                     max_length=SEQ_LENGTH)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    clock = StepClock()
    trl.RewardTrainer(model=model, args=args, train_dataset=_dataset(data), processing_class=tokenizer,
                      callbacks=[clock]).train()
    return {**_step_times(clock.stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - clock.start_rss}


def trl_dpo(hf: str, data: str, out: str, steps: int, threads: int) -> dict:
    trl = _trl()
    args = _trl_args(trl.DPOConfig, out, steps, threads, per_device_train_batch_size=PAIRS_PER_STEP,
                     max_length=SEQ_LENGTH, beta=DPO_BETA)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    clock = StepClock()
    trl.DPOTrainer(model=model, args=args, train_dataset=_dataset(data), processing_class=tokenizer,
                   callbacks=[clock]).train()
    return {**_step_times(clock.stamps), "peak_mb": _rss_mb(), "rise_mb": _rss_mb() - clock.start_rss}


def digit_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's view of our ``digit_match`` reward: the same function on the decoded completion (EOS removed) and the
    prompt line's ``answer``."""
    return [digit_match_score(completion, str(want)) for completion, want in zip(completions, answer)]


def trl_grpo_settings(cfg: dict, rl: dict) -> dict:
    """``GRPOConfig`` keywords that do what our ``(cfg, rl)`` (the demo's ``rl_configs``) does.

    Ours, per iteration: ``global_batch_size`` prompts x ``n_samples_per_prompt`` samples, split into
    ``ppo_mini_batches`` optimizer steps (``ppo_epochs`` passes) of micro-batches of ``micro_batch_size``. TRL: one
    generation of ``steps_per_generation x per_device_train_batch_size`` samples feeds ``steps_per_generation``
    micro-steps, ``gradient_accumulation_steps`` of them per optimizer step, so an optimizer step sees one of our
    mini-batches; ``max_steps`` counts optimizer steps. The GRPO preset's KL is a loss (k3 estimator, TRL's only
    one) weighted by ``kl_loss_coef`` (default ``kl_coef``); our token-mean over an optimizer step's tokens is TRL's
    ``dapo`` loss; our group-std normalisation is TRL's ``scale_rewards="group"``."""
    train, r = TrainConfig.from_dict({"mode": "finetune", **cfg}), RLConfig.from_dict(rl).resolved()
    if r.adv_estimator != "grpo" or r.use_kl_in_reward or not r.use_kl_loss or r.kl_loss_type != "k3" \
            or r.loss_agg_mode != "token-mean" or not r.grpo_norm_by_std or r.clip_ratio_c is not None:
        raise ValueError("the TRL side mirrors GRPO with a k3 KL loss, token-mean aggregation and group-std "
                         "normalisation only")
    samples = train.global_batch_size * r.n_samples_per_prompt
    per_step = samples // r.ppo_mini_batches
    low = r.clip_ratio if r.clip_ratio_low is None else r.clip_ratio_low
    high = r.clip_ratio if r.clip_ratio_high is None else r.clip_ratio_high
    return dict(
        max_steps=train.train_iters * r.ppo_mini_batches * r.ppo_epochs, num_generations=r.n_samples_per_prompt,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=per_step // train.micro_batch_size,
        steps_per_generation=samples // train.micro_batch_size, num_iterations=r.ppo_epochs,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0,
        beta=r.kl_loss_coef, epsilon=low, epsilon_high=high, loss_type="dapo", scale_rewards="group",
        learning_rate=train.lr, lr_scheduler_type="constant", warmup_steps=train.lr_warmup_iters,
        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_eps, max_grad_norm=train.clip_grad, seed=train.seed, bf16=False, fp16=False,
        gradient_checkpointing=False, mask_truncated_completions=False)


def trl_grpo(start_hf: str, prompts: str, out: str, settings: dict, threads: int) -> dict:
    """TRL's GRPOTrainer from ``start_hf``; saves the trained model to ``out/final``."""
    trl = _trl()
    torch.set_num_threads(threads)
    args = trl.GRPOConfig(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10 ** 6,
                          dataloader_num_workers=0, disable_tqdm=True, **settings)
    tokenizer = AutoTokenizer.from_pretrained(start_hf)
    model = AutoModelForCausalLM.from_pretrained(start_hf, dtype=torch.float32)
    clock = StepClock()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=digit_match_reward, args=args, train_dataset=_dataset(prompts),
                              processing_class=tokenizer, callbacks=[clock])
    rollout_times = []
    generate_and_score = trainer._generate_and_score_completions  # rollout: generate, reward, ref and old log-probs

    def timed(*a, **k):
        begin = time.perf_counter()
        result = generate_and_score(*a, **k)
        rollout_times.append(time.perf_counter() - begin)
        return result

    trainer._generate_and_score_completions = timed
    trainer.train()
    per_iteration = settings["max_steps"] // len(rollout_times)  # optimizer steps per generation
    times = _step_times(clock.stamps[per_iteration - 1::per_iteration])
    rollout = sum(rollout_times[1:]) / len(rollout_times[1:])
    peak, rise = _rss_mb(), _rss_mb() - clock.start_rss
    trainer.save_model(str(Path(out) / "final"))
    return {**times, "rollout": rollout, "training": times["step"] - rollout, "peak_mb": peak, "rise_mb": rise}


# ---- one held-out evaluation for both sides ----

@torch.no_grad()
def evaluate_hf(model_dir: str, tokenizer_dir: str, eval_path: str, max_new_tokens: int) -> dict:
    """Greedy answers of the HF model in ``model_dir`` to every held-out line of ``eval_path`` (transformers
    ``generate``; prompts tokenized without special tokens, as ours does, and batched by length so nothing is
    padded), scored as our ``exact_match`` / ``digit_match`` rewards score them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = _jsonl(eval_path)
    by_length = defaultdict(list)
    for i, row in enumerate(rows):
        ids = tokenizer.encode(row["prompt"], add_special_tokens=False)
        by_length[len(ids)].append((i, ids))
    answers = [""] * len(rows)
    eos = tokenizer.eos_token_id
    for length, group in by_length.items():
        inputs = torch.tensor([ids for _, ids in group])
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
        for (i, _), generated in zip(group, out[:, length:].tolist()):
            if eos in generated:
                generated = generated[:generated.index(eos)]
            answers[i] = tokenizer.decode(generated).strip()
    wanted = [str(row["answer"]).strip() for row in rows]
    return {"exact_match": sum(a == w for a, w in zip(answers, wanted)) / len(rows),
            "digit_match": sum(digit_match_score(a, w) for a, w in zip(answers, wanted)) / len(rows),
            "distinct": len(set(answers)) / len(rows)}


# ---- the GRPO comparison ----

def grpo_start(work: Path, hf: str | None, sft_iters: int, task_sizes: dict | None = None) -> dict:
    """The digit task's files and the start model as ours reads it (``mcore``) and as TRL does (``hf``): ``hf`` as
    is (converted for ours), or the demo's tiny llama after the demo's SFT (exported to HF). A workdir that already
    holds them is reused."""
    paths = write_digit_task(work / "task", GRPO_TASK, DIGITS, hint=HINT, distractor=DISTRACTOR,
                             **(task_sizes or {}))
    if hf is not None:
        mcore = work / "start_mcore"
        if not mcore.is_dir():
            hf_to_mcore(hf, mcore)
        return {**paths, "mcore": str(mcore), "hf": hf}
    sft, sft_hf = work / f"sft-{GRPO_TASK}-{DISTRACTOR}-{HINT}-{sft_iters}", work / "sft_hf"
    if not (sft / "latest_checkpointed_iteration.txt").is_file():
        base = str(work / "mcore") if (work / "mcore").is_dir() else make_tiny_checkpoint(work)
        run_on_local_ranks(_sft_worker, 1, sft_config(base, paths["sft"], str(sft), sft_iters))
    if not (sft_hf / "config.json").is_file():
        mcore_to_hf(sft, sft_hf, overwrite=True)
    return {**paths, "mcore": str(sft), "hf": str(sft_hf)}


def grpo_configs(start: dict, steps: int, save: str, **overrides) -> tuple[dict, dict]:
    """The demo's RL settings (``rl_configs``) on ``start``, saving to ``save``, held-out evals before and after."""
    cfg, rl = rl_configs("grpo", start["mcore"], start["prompts"], steps, save, start["eval"])
    cfg.update(eval_interval=0, log_interval=max(steps, 1))
    cfg.update({k: v for k, v in overrides.items() if k in cfg})
    rl.update({k: v for k, v in overrides.items() if k not in cfg})
    return cfg, rl


def run_ours_grpo(start: dict, work: Path, steps: int, threads: int, **overrides) -> dict:
    """Ours from ``start`` for ``steps`` iterations, its trained actor exported to HF (``result["hf"]``)."""
    shutil.rmtree(work / "ours", ignore_errors=True)  # a checkpoint left there would be resumed
    cfg, rl = grpo_configs(start, steps, str(work / "ours"), **overrides)
    result = run_on_local_ranks(ours_grpo, 1, cfg, rl, threads)[0]
    result["hf"] = str(mcore_to_hf(work / "ours" / "actor", work / "ours_hf", overwrite=True))
    result["max_new_tokens"] = rl["max_new_tokens"]
    return result


def _change(before: float, after: float) -> str:
    return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"


def _ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b else "n/a"


def report_grpo(before: dict, sides: dict[str, dict], evals: dict[str, dict]) -> list[str]:
    """The printed table: per side the held-out scores before -> after, step times and memory, then ours / TRL."""
    lines = [f"{'':5s} {'held-out exact_match':26s} {'digit_match':26s} {'distinct':8s} {'step wall':>9s} "
             f"{'cpu':>7s} {'rollout':>7s} {'train':>7s} {'peak RSS':>9s} {'rise':>7s}"]
    for name, side in sides.items():
        after = evals[name]
        lines.append(f"{name:5s} {_change(before['exact_match'], after['exact_match']):26s} "
                     f"{_change(before['digit_match'], after['digit_match']):26s} {after['distinct']:8.2f} "
                     f"{side['step']:8.3f}s {side['cpu']:6.3f}s {side['rollout']:6.3f}s {side['training']:6.3f}s "
                     f"{side['peak_mb']:7.0f}MB {side['rise_mb']:5.0f}MB")
    if {"ours", "TRL"} <= sides.keys():
        ours, trl = sides["ours"], sides["TRL"]
        gain = {name: evals[name]["exact_match"] - before["exact_match"] for name in sides}
        lines.append(f"ours / TRL: held-out exact-match gain {gain['ours']:+.3f} vs {gain['TRL']:+.3f}; step wall "
                     f"{_ratio(ours['step'], trl['step'])}, cpu {_ratio(ours['cpu'], trl['cpu'])}, rollout "
                     f"{_ratio(ours['rollout'], trl['rollout'])}, training {_ratio(ours['training'], trl['training'])}"
                     f"; peak RSS {_ratio(ours['peak_mb'], trl['peak_mb'])}, rise "
                     f"{_ratio(ours['rise_mb'], trl['rise_mb'])}")
    if "ours" in sides:
        (_, first), (_, last) = sides["ours"]["evals"][0], sides["ours"]["evals"][-1]
        lines.append(f"cross-check, ours' generation engine in its loop on the same prompts: exact_match "
                     f"{first['eval/exact_match']:.3f} -> {last['eval/exact_match']:.3f}, digit_match "
                     f"{first['eval/reward']:.3f} -> {last['eval/reward']:.3f}, distinct {last['eval/distinct']:.2f}")
    return lines


def compare_grpo(work: Path, hf: str | None, steps: int, threads: int, with_trl: bool) -> list[str]:
    start = grpo_start(work, hf, SFT_ITERS)
    sides = {"ours": run_ours_grpo(start, work, steps, threads)}
    new_tokens = sides["ours"]["max_new_tokens"]
    if with_trl:
        cfg, rl = grpo_configs(start, steps, str(work / "ours"))
        shutil.rmtree(work / "trl", ignore_errors=True)
        sides["TRL"] = _in_fresh_process(trl_grpo, start["hf"], start["prompts"], str(work / "trl"),
                                         trl_grpo_settings(cfg, rl), threads)
        sides["TRL"]["hf"] = str(work / "trl" / "final")
    before = evaluate_hf(start["hf"], start["hf"], start["eval"], new_tokens)
    evals = {name: evaluate_hf(side["hf"], start["hf"], start["eval"], new_tokens) for name, side in sides.items()}
    count = len(_jsonl(start["eval"]))
    head = (f"GRPO, '{GRPO_TASK}' digit task, {steps} iterations from "
            f"{hf or f'the demo tiny llama after {SFT_ITERS} SFT steps'}; held-out: {count} prompts, greedy, "
            f"one evaluation (transformers generate) for both sides")
    return [head, *report_grpo(before, sides, evals)]


def _ratios(name: str, ours: dict, trl: dict) -> None:
    keys = [k for k in ("step", "cpu", "rollout", "training") if k in ours and k in trl]
    times = ", ".join(f"{k} {ours[k]:.3f}s vs {trl[k]:.3f}s (x{ours[k] / trl[k]:.2f})" for k in keys)
    print(f"{name:12s} ours/TRL: {times}; peak RSS {ours['peak_mb']:.0f} vs {trl['peak_mb']:.0f} MB "
          f"(x{ours['peak_mb'] / trl['peak_mb']:.2f}), rise in training {ours['rise_mb']:.0f} vs "
          f"{trl['rise_mb']:.0f} MB", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimizer steps (reward, dpo; default 8) or RL iterations "
                                                  "(grpo; default 20) per run (>= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default: 1)")
    parser.add_argument("--only", default="reward,dpo,grpo", help="comma-separated subset of reward,dpo,grpo")
    parser.add_argument("--hf", help="GRPO: start both sides from this HF llama / qwen directory (with its tokenizer) "
                                     "instead of the demo's tiny llama after SFT")
    parser.add_argument("--workdir", help="keep the data and checkpoints here; a start model already there (the SFT "
                                          "checkpoint, its HF export) is reused (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 3:
        parser.error("--steps must be >= 3 (the first step is not timed)")
    wanted = set(args.only.split(","))
    if wanted - set(DEFAULT_STEPS):
        parser.error(f"--only: unknown {', '.join(sorted(wanted - set(DEFAULT_STEPS)))}")
    if args.hf is not None and not (Path(args.hf) / "config.json").is_file():
        parser.error(f"--hf {args.hf}: not a HF model directory (no config.json)")
    try:
        trl = _trl()
    except ImportError:
        sys.exit("error: TRL is not installed (pip install -e .[bench])")
    steps = {name: args.steps or default for name, default in DEFAULT_STEPS.items()}
    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__};"
          f" {args.threads} thread(s), CPU", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if wanted & {"reward", "dpo"}:
            pref = work / "preference"
            mcore, hf = make_tiny_checkpoint(pref), str(pref / "hf")
            pairs, _ = write_toy_preferences(pref / "pairs")
            cfg = dict(load=mcore, train_data_path=pairs, seq_length=SEQ_LENGTH, micro_batch_size=PAIRS_PER_STEP,
                       global_batch_size=PAIRS_PER_STEP, lr=LR, lr_decay_style="constant", weight_decay=0.0)
            if "reward" in wanted:
                run = dict(cfg, train_iters=steps["reward"], log_interval=steps["reward"])
                ours = run_on_local_ranks(ours_reward, 1, run, args.threads)[0]
                _ratios("reward model", ours, _in_fresh_process(trl_reward, hf, pairs, str(pref / "t_rm"),
                                                                steps["reward"], args.threads))
            if "dpo" in wanted:
                run = dict(cfg, train_iters=steps["dpo"], log_interval=steps["dpo"])
                ours = run_on_local_ranks(ours_dpo, 1, run, args.threads)[0]
                _ratios("DPO", ours, _in_fresh_process(trl_dpo, hf, pairs, str(pref / "t_dpo"), steps["dpo"],
                                                       args.threads))
        if "grpo" in wanted:
            for line in compare_grpo(work / "grpo", args.hf, steps["grpo"], args.threads, with_trl=True):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
