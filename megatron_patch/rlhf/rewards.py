"""Programmatic rewards (a registry), for tasks whose answer a program can check.

A reward is registered as a factory ``factory(tokenizer, max_new_tokens) -> score`` with
``score(prompt_ids, response_ids) -> float | list[float]``: a float is an outcome score (placed on the last
response token), a list gives one reward per response token (a dense reward: PPO's GAE credits each token
directly; GRPO uses the sum). ``response_ids`` end with EOS when the model stopped. Scores are computed on the host,
from the token ids every rank already holds after generation (no collective needed).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..registry import Registry

RewardFn = Callable[[list[int], list[int]], "float | list[float]"]
_REWARDS: Registry[Callable[..., RewardFn]] = Registry("--reward-fn", ConfigError)


def register_reward(name: str):
    """Decorator: register ``factory(tokenizer, max_new_tokens) -> score`` under ``name``."""
    return _REWARDS.register(name)


def reward_names() -> list[str]:
    return _REWARDS.names()


def build_reward_fn(name: str, tokenizer, max_new_tokens: int) -> RewardFn:
    return _REWARDS.get(name)(tokenizer, max_new_tokens)


def count_up_target(prompt: str, length: int) -> str:
    """The ``length`` digits that continue the prompt's last digit upwards, modulo 10 (``"789"`` -> ``"0123"``)."""
    digits = [c for c in prompt if c.isdigit()]
    last = int(digits[-1]) if digits else -1
    return "".join(str((last + 1 + i) % 10) for i in range(length))


@register_reward("count_up")
def _count_up(tokenizer, max_new_tokens: int) -> RewardFn:
    """The toy task: continue a digit sequence counting up. Dense and local: response token ``t`` earns
    ``1 / max_new_tokens`` when it is the digit one above the digit before it (the prompt's last digit for ``t = 0``;
    digits are single tokens, modulo 10), so a row's total is the fraction of steps that counted (0 .. 1)."""
    digit_of = {tokenizer.encode(str(d))[0]: d for d in range(10)}

    def score(prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        previous = int(count_up_target(tokenizer.decode(prompt_ids), 1)) - 1
        rewards = []
        for token in response_ids:
            digit = digit_of.get(token)
            rewards.append(float(previous is not None and digit == (previous + 1) % 10) / max_new_tokens)
            previous = digit
        return rewards

    return score


@register_reward("digits")
def _digits(tokenizer, max_new_tokens: int) -> RewardFn:
    """Fraction of the response's tokens that are single digits: an easy reward for short tests."""
    digit_ids = {tokenizer.encode(str(d))[0] for d in range(10)}

    def score(prompt_ids: list[int], response_ids: list[int]) -> float:
        return sum(t in digit_ids for t in response_ids) / max_new_tokens

    return score
