"""Toy tasks whose answer depends on the prompt and a program can check, with disjoint train / held-out prompts.

A task maps a digit string (``"3075"``) to its answer (``copy``: ``"3075"``; ``reverse``: ``"5703"``; ``increment``:
``"4186"``). Prompts are distinct random digit strings of one length, drawn without replacement from the
``10 ** length`` possible ones and split once: the held-out prompts never appear in SFT data or RL prompts, so a
policy can only score on them by computing the answer. A constant answer matches at most the held-out prompts whose
answer it happens to be (about ``10 ** -length`` of them).

The SFT answers are the task's (``hint`` 1.0) or, with ``hint`` < 1, the task's only that often and a *distractor*
(another prompt-dependent answer) otherwise. The tiny llama learns ``copy`` from clean answers in about 100 steps
(held-out greedy exact match 0.20 after 80 steps, 0.97 after 100); mixtures and ``reverse`` take it far longer. The
RL and held-out prompt files carry ``"answer"``, which the ``exact_match`` / ``digit_match`` rewards (``rlhf.ppo.rewards``)
compare the response with.
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
    """``answer(digits) -> str`` is what is rewarded; ``distractor(digits) -> str`` the SFT's other behaviour."""

    name: str
    answer: Callable[[str], str]
    distractor: Callable[[str], str]


_TASKS: Registry[DigitTask] = Registry("task", ConfigError)


def _register(task: DigitTask) -> None:
    _TASKS.add(task.name, task)


def _increment(digits: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in digits)


_register(DigitTask("reverse", lambda s: s[::-1], lambda s: s))
_register(DigitTask("copy", lambda s: s, lambda s: s[::-1]))
_register(DigitTask("increment", _increment, lambda s: s))


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


def write_digit_task(out: str | Path, task: str = "reverse", length: int = 5, n_sft: int = 2048,
                     n_train: int = 2048, n_eval: int = 128, hint: float = 1.0, seed: int = 0) -> dict[str, str]:
    """Write ``sft.jsonl`` (``instruction``/``output``), ``prompts.jsonl`` and ``eval.jsonl`` (``prompt``/``answer``,
    the prompt in the SFT template) and ``ptx.jsonl`` (``text``: task prompts with their answers) under ``out``;
    the SFT, RL and PTX prompts are disjoint from the held-out ones. Returns ``{name: path}``."""
    spec = get_task(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = split_prompts(length, {"eval": n_eval, "sft": n_sft, "train": n_train}, seed)
    rng = random.Random(seed + 1)
    sft = [{"instruction": s, "output": spec.answer(s) if rng.random() < hint else spec.distractor(s)}
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
