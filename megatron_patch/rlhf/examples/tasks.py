"""Toy tasks whose answer depends on the prompt and a program can check, with disjoint train / held-out prompts.

A task maps a digit string (``"3075"``) to its answer (``copy``: ``"3075"``; ``reverse``: ``"5703"``; ``increment``:
``"4186"``). Prompts are distinct random digit strings of one length, drawn without replacement from the
``10 ** length`` possible ones and split once: the held-out prompts never appear in SFT data or RL prompts, so a
policy can only score on them by computing the answer. A constant answer matches at most the held-out prompts whose
answer it happens to be (about ``10 ** -length`` of them).

SFT data mixes behaviours the way real demonstrations do: a share ``hint`` of the SFT answers are the task's, the
rest a *distractor*'s (``DISTRACTORS``): ``constant`` (``"0000"`` whatever the prompt: a lazy answer), or another
task's answer. The demos use ``copy`` with the ``constant`` distractor at ``hint`` 0.5: after 400 SFT steps the tiny
llama has learned both behaviours and, greedily, answers most held-out prompts with ``"0000"`` (held-out exact match
0.23, distinct answers 0.24); RL with the task's reward has to make it compute the answer on prompts it never saw.
With clean answers (``hint`` 1.0) SFT alone learns ``copy`` in about 100 steps, through a sharp transition
(held-out greedy exact match 0 at step 70, 0.20 at 80, 0.97 at 100), and RL from the step-80 checkpoint does not
speed it up (rlhf/README.md). The RL and held-out prompt files carry ``"answer"``, which the ``exact_match`` /
``digit_match`` rewards (``rlhf.ppo.rewards``) compare the response with.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...data.sft import PROMPT
from ...errors import ConfigError
from ...registry import Registry


@dataclass(frozen=True)
class DigitTask:
    """``answer(digits) -> str`` is what is rewarded."""

    name: str
    answer: Callable[[str], str]


def _increment(digits: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in digits)


_TASKS: Registry[DigitTask] = Registry("task", ConfigError)
for _task in (DigitTask("copy", lambda s: s), DigitTask("reverse", lambda s: s[::-1]),
              DigitTask("increment", _increment)):
    _TASKS.add(_task.name, _task)

# What the SFT answers instead of the task's, a share ``1 - hint`` of the time.
DISTRACTORS: Registry[Callable[[str], str]] = Registry("distractor", ConfigError)
DISTRACTORS.add("constant", lambda s: "0" * len(s))
for _task in _TASKS.values():
    DISTRACTORS.add(_task.name, _task.answer)


def get_task(name: str) -> DigitTask:
    return _TASKS.get(name)


def task_names() -> list[str]:
    return _TASKS.names()


def split_prompts(length: int, counts: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Disjoint sets of distinct ``length``-digit strings, one per entry of ``counts`` (name -> size)."""
    total = sum(counts.values())
    if total > 10 ** length:
        raise ConfigError(f"{total} distinct prompts need more than {length} digits")
    pool = [f"{n:0{length}d}" for n in random.Random(seed).sample(range(10 ** length), total)]
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = pool[start:start + count]
        start += count
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_digit_task(out: str | Path, task: str = "copy", length: int = 4, n_sft: int = 2048,
                     n_train: int = 2048, n_eval: int = 128, hint: float = 1.0, distractor: str = "constant",
                     seed: int = 0) -> dict[str, str]:
    """Write ``sft.jsonl`` (``instruction``/``output``: the task's answer with probability ``hint``, else the
    ``distractor``'s), ``prompts.jsonl`` and ``eval.jsonl`` (``prompt``/``answer``, the prompt in the SFT template)
    and ``ptx.jsonl`` (``text``: task prompts with their answers) under ``out``; the SFT, RL and PTX prompts are
    disjoint from the held-out ones. Returns ``{name: path}``."""
    spec, other = get_task(task), DISTRACTORS.get(distractor)
    if distractor == task:
        raise ConfigError(f"the distractor must differ from the task ({task})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = split_prompts(length, {"eval": n_eval, "sft": n_sft, "train": n_train}, seed)
    rng = random.Random(seed + 1)
    sft = [{"instruction": s, "output": spec.answer(s) if rng.random() < hint else other(s)}
           for s in sets["sft"]]

    def rl_rows(prompts: list[str]) -> list[dict]:
        return [{"prompt": PROMPT.format(instruction=s), "answer": spec.answer(s)} for s in prompts]

    return {
        "sft": _write_jsonl(out / "sft.jsonl", sft),
        "prompts": _write_jsonl(out / "prompts.jsonl", rl_rows(sets["train"])),
        "eval": _write_jsonl(out / "eval.jsonl", rl_rows(sets["eval"])),
        "ptx": _write_jsonl(out / "ptx.jsonl", [{"text": PROMPT.format(instruction=s) + spec.answer(s)}
                                                for s in sets["sft"][:256]]),
    }
