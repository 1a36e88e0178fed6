"""Programmatic rewards: built-in verifiers (a registry) and user functions ``py:FILE:FUNC``.

``--reward NAME`` picks a registered reward; ``--reward py:FILE:FUNC`` loads ``FUNC`` from the Python file ``FILE``
(verl's ``custom_reward_function`` / TRL's ``reward_funcs`` idea): it is called once per sample as
``FUNC(prompt=..., response=..., **fields)`` with the prompt text, the decoded response (EOS removed) and the prompt
line's other jsonl keys (``answer``, ...), and returns a number (an outcome score). Built-ins:

  - ``exact_match``: 1 when the response (stripped) equals the line's ``answer`` (stripped), else 0;
  - ``digit_match``: the share of the ``answer``'s characters the response has at the same position (partial
    credit; 1 only for the exact answer);
  - ``numeric``: 1 when the last number in the response equals the number in ``answer``, else 0;
  - ``count_up``, ``digits``: small token-level rewards the older tests use (``count_up`` pays a constant
    counting string whatever the prompt: not a task to show learning on).

A reward returns a float (placed on the last response token) or, for the token-level built-ins, one float per
response token (PPO's GAE credits each token; GRPO and RLOO use the sum). Every result is checked: an exception,
a non-number or a non-finite value stops the run with one line naming the reward, the prompt file and its line.
Scores are computed on the host from the token ids every rank holds after generation (no collective needed).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, DataError
from ...registry import Registry


@dataclass(frozen=True)
class Sample:
    """One response to score.

    Attributes:
        prompt: the prompt text (as in the jsonl).
        response: the decoded response, EOS removed.
        prompt_ids, response_ids: token ids (``response_ids`` end with EOS when the model stopped).
        fields: the prompt line's other keys (``{"answer": "15703"}``).
        line: the prompt's line number in its file (for messages).
        finished: the response ended with EOS (within ``--max-new-tokens``).
    """

    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    fields: dict = field(default_factory=dict)
    line: int = 0
    finished: bool = True


Score = Callable[[Sample], "float | list[float]"]


@dataclass(frozen=True)
class Reward:
    """A reward as the loop uses it.

    Attributes:
        name: what the user passed (``exact_match``, ``py:FILE:FUNC``), for messages.
        score: ``score(sample) -> float | list[float]``.
        needs: jsonl keys every prompt line must carry (checked when the prompt files are read).
        match: ``match(sample) -> bool`` when the reward has a notion of a right answer (``eval/exact_match``).
    """

    name: str
    score: Score
    needs: tuple[str, ...] = ()
    match: Callable[[Sample], bool] | None = None

    def __call__(self, sample: Sample, source: str) -> float | list[float]:
        """The checked score of ``sample``; ``source`` (the prompt file) goes into the one-line error."""
        where = f"--reward {self.name} on {source} line {sample.line}"
        try:
            value = self.score(sample)
        except Exception as error:  # a user function's failure becomes one line naming where it happened
            raise DataError(f"{where} raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                            ) from None
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"{where} returned {v!r}: a reward must be a finite number")
        if isinstance(value, list) and len(value) > len(sample.response_ids):
            raise DataError(f"{where} returned {len(value)} token rewards for a {len(sample.response_ids)}-token "
                            f"response")
        return value


RewardFactory = Callable[..., Reward]
_REWARDS: Registry[RewardFactory] = Registry("--reward", ConfigError, choices_word="built-in rewards; or py:FILE:FUNC")


def register_reward(name: str):
    """Decorator: register ``factory(tokenizer, max_new_tokens) -> Reward | Score`` under ``name``."""
    return _REWARDS.register(name)


def reward_names() -> list[str]:
    return _REWARDS.names()


def build_reward(spec: str, tokenizer, max_new_tokens: int) -> Reward:
    """The reward ``spec`` names: a registered name or ``py:FILE:FUNC``; ConfigError (one line) otherwise."""
    if spec.startswith("py:"):
        return load_user_reward(spec)
    built = _REWARDS.get(spec)(tokenizer, max_new_tokens)
    return built if isinstance(built, Reward) else Reward(spec, built)


def load_user_reward(spec: str) -> Reward:
    """``py:FILE:FUNC`` -> a Reward calling ``FUNC(prompt=, response=, **fields)``; ConfigError when the file does
    not exist, cannot be imported, or has no callable ``FUNC``."""
    body = spec[len("py:"):]
    path, _, name = body.rpartition(":")
    if not path or not name:
        raise ConfigError(f"--reward {spec}: expected py:FILE:FUNC (a Python file and a function in it)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--reward {spec}: the file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"megatron_patch_user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's file: one line naming it instead of a traceback into our code
        raise ConfigError(f"--reward {spec}: importing {file} raised {type(error).__name__}: {error}") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise ConfigError(f"--reward {spec}: {file} has no function '{name}'")
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    accepted = {p.name for p in parameters}

    def score(sample: Sample) -> float:
        extra = sample.fields if takes_any else {k: v for k, v in sample.fields.items() if k in accepted}
        return func(prompt=sample.prompt, response=sample.response, **extra)

    return Reward(spec, score)


# --------------------------------------------------------------------------------------------------------------
# Verifiers: compare the response with the line's "answer"
# --------------------------------------------------------------------------------------------------------------


def _answer(sample: Sample) -> str:
    return str(sample.fields["answer"]).strip()


def exact_match(sample: Sample) -> bool:
    return sample.response.strip() == _answer(sample)


def digit_match_score(response: str, answer: str) -> float:
    """Share of ``answer``'s positions where ``response`` has the same character, over the longer of the two (so
    extra characters cost as much as missing ones); 1 only for the exact answer."""
    response, answer = response.strip(), answer.strip()
    longest = max(len(response), len(answer), 1)
    return sum(a == b for a, b in zip(response, answer)) / longest


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (``"so the answer is -12.5."`` -> -12.5), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numeric_match(sample: Sample) -> bool:
    got, want = final_number(sample.response), final_number(_answer(sample))
    return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


@register_reward("exact_match")
def _exact_match(tokenizer, max_new_tokens: int) -> Reward:
    return Reward("exact_match", lambda s: float(exact_match(s)), needs=("answer",), match=exact_match)


@register_reward("digit_match")
def _digit_match(tokenizer, max_new_tokens: int) -> Reward:
    return Reward("digit_match", lambda s: digit_match_score(s.response, _answer(s)), needs=("answer",),
                  match=exact_match)


@register_reward("numeric")
def _numeric(tokenizer, max_new_tokens: int) -> Reward:
    return Reward("numeric", lambda s: float(numeric_match(s)), needs=("answer",), match=numeric_match)


# --------------------------------------------------------------------------------------------------------------
# Token-level toys (older tests and the GPU check)
# --------------------------------------------------------------------------------------------------------------


def count_up_target(prompt: str, length: int) -> str:
    """The ``length`` digits that continue the prompt's last digit upwards, modulo 10 (``"789"`` -> ``"0123"``)."""
    digits = [c for c in prompt if c.isdigit()]
    last = int(digits[-1]) if digits else -1
    return "".join(str((last + 1 + i) % 10) for i in range(length))


@register_reward("count_up")
def _count_up(tokenizer, max_new_tokens: int) -> Score:
    """Response token ``t`` earns ``1 / max_new_tokens`` when it is the digit one above the digit before it (the
    prompt's last digit for ``t = 0``; modulo 10). Beyond the first digit this pays any counting string, whatever
    the prompt: a constant answer earns most of it."""
    digit_of = {tokenizer.encode(str(d))[0]: d for d in range(10)}

    def score(sample: Sample) -> list[float]:
        previous = int(count_up_target(sample.prompt, 1)) - 1
        rewards = []
        for token in sample.response_ids:
            digit = digit_of.get(token)
            rewards.append(float(previous is not None and digit == (previous + 1) % 10) / max_new_tokens)
            previous = digit
        return rewards

    return score


@register_reward("digits")
def _digits(tokenizer, max_new_tokens: int) -> Score:
    """Fraction of the response's tokens that are single digits: an easy reward for short tests."""
    digit_ids = {tokenizer.encode(str(d))[0] for d in range(10)}
    return lambda sample: sum(t in digit_ids for t in sample.response_ids) / max_new_tokens
