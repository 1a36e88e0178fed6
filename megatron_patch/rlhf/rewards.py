"""Programmatic rewards (a registry), for tasks whose answer a program can check.

A reward is registered as a factory ``factory(tokenizer, max_new_tokens) -> score`` with
``score(prompt_ids, response_ids) -> float``; ``response_ids`` end with EOS when the model stopped. Scores are
computed on the host, from the token ids every rank already holds after generation (no collective needed).
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[list[int], list[int]], float]
_REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    def register(factory):
        if name in _REWARDS:
            raise ValueError(f"reward '{name}' is registered twice")
        _REWARDS[name] = factory
        return factory

    return register


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def build_reward_fn(name: str, tokenizer, max_new_tokens: int) -> RewardFn:
    if name not in _REWARDS:
        raise ValueError(f"unknown --reward-fn '{name}' (valid: {', '.join(reward_names())})")
    return _REWARDS[name](tokenizer, max_new_tokens)


def count_up_target(prompt: str, length: int) -> str:
    """The ``length`` digits that continue the prompt's last digit upwards, modulo 10 (``"789"`` -> ``"0123"``)."""
    digits = [c for c in prompt if c.isdigit()]
    last = int(digits[-1]) if digits else -1
    return "".join(str((last + 1 + i) % 10) for i in range(length))


@register_reward("count_up")
def _count_up(tokenizer, max_new_tokens: int) -> RewardFn:
    """The toy task: continue a digit sequence counting up. Dense: the score is the fraction of the
    ``max_new_tokens`` response characters that match the target position by position (0 .. 1)."""

    def score(prompt_ids: list[int], response_ids: list[int]) -> float:
        eod = tokenizer.eod
        text = tokenizer.decode([t for t in response_ids if t != eod])
        target = count_up_target(tokenizer.decode(prompt_ids), max_new_tokens)
        return sum(a == b for a, b in zip(text, target)) / max_new_tokens

    return score


@register_reward("digits")
def _digits(tokenizer, max_new_tokens: int) -> RewardFn:
    """Fraction of the response's tokens that are single digits: an easy reward for short tests."""
    digit_ids = {tokenizer.encode(str(d))[0] for d in range(10)}

    def score(prompt_ids: list[int], response_ids: list[int]) -> float:
        return sum(t in digit_ids for t in response_ids) / max_new_tokens

    return score
