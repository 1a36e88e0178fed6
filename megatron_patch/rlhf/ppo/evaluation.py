"""Held-out evaluation inside the RL loop: greedy answers of the actor on prompts it never trains on, scored with
the run's reward.

The actor's own generation engine answers (at the training TP x PP, the weights being trained); each data-parallel
rank answers every ``dp``-th held-out prompt and the results are gathered, so every rank reports the same numbers.
Metrics (``eval/...``):
  - ``eval/reward``: the mean reward (a token-level reward counts as its sum);
  - ``eval/exact_match``: the share of right answers, when the reward has a notion of one (``Reward.match``);
  - ``eval/distinct``: the share of distinct answers (1: every prompt got its own answer; a policy that collapsed
    onto one string has ``1 / prompts``), next to ``eval/reference_distinct``, the same share of the lines'
    ``answer`` when they carry one;
  - ``eval/length``: mean response tokens.
"""

from __future__ import annotations

import torch.distributed as dist

from ...generation import SamplingParams
from .rewards import Reward, Sample
from .rollout_data import Prompt, PromptDataset


def make_sample(tokenizer, prompt: Prompt, response_ids: list[int]) -> Sample:
    """The reward's view of one response: decoded text without EOS, and whether EOS ended it."""
    finished = bool(response_ids) and response_ids[-1] == tokenizer.eod
    text = tokenizer.decode(response_ids[:-1] if finished else response_ids)
    return Sample(prompt.text, text, prompt.ids, response_ids, prompt.fields, prompt.line, finished)


def score_total(value: float | list[float]) -> float:
    return float(sum(value)) if isinstance(value, list) else float(value)


def evaluate(engine, tokenizer, reward: Reward, prompts: PromptDataset, max_new_tokens: int, dp_rank: int = 0,
             dp: int = 1, dp_group=None) -> dict[str, float]:
    """Greedy answers to every prompt of ``prompts`` scored with ``reward``; returns the ``eval/...`` metrics (the
    same on every rank). Every rank of the model replica calls it (the engine runs the TP x PP collectives)."""
    mine = prompts.records[dp_rank::dp]
    responses = engine.generate([p.ids for p in mine], max_new_tokens, SamplingParams(top_k=1)) if mine else []
    rows = []
    for prompt, response in zip(mine, responses):
        sample = make_sample(tokenizer, prompt, response)
        rows.append((sample.response.strip(), score_total(reward(sample, prompts.path)),
                     None if reward.match is None else bool(reward.match(sample)), len(response)))
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, rows, group=dp_group)
        rows = [row for part in gathered for row in part]
    count = len(rows)
    metrics = {"eval/reward": sum(r[1] for r in rows) / count,
               "eval/distinct": len({r[0] for r in rows}) / count,
               "eval/length": sum(r[3] for r in rows) / count}
    if reward.match is not None:
        metrics["eval/exact_match"] = sum(r[2] for r in rows) / count
    answers = [str(p.fields["answer"]).strip() for p in prompts.records if "answer" in p.fields]
    if len(answers) == len(prompts.records):
        metrics["eval/reference_distinct"] = len(set(answers)) / len(answers)
    return metrics
