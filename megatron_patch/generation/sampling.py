"""Next-token selection: greedy, top-k, top-p (nucleus), temperature and repetition penalty.

Conventions follow Megatron-LM's text generation: ``top_k == 1`` is greedy, ``top_k`` and ``top_p`` may not both
be non-zero, and ``top_k == top_p == 0`` samples from the whole (temperature-scaled) distribution. The repetition
penalty is the CTRL / HF ``transformers`` one (a seen token's logit is divided by the penalty when positive and
multiplied when negative), so greedy decoding with a penalty matches ``transformers``' ``generate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        top_k: keep the k most likely tokens; 1 is greedy; 0 disables the filter.
        top_p: keep the smallest set of tokens whose probability reaches p; 0 disables the filter.
        temperature: divide the logits by this before sampling (> 0; ignored by greedy decoding).
        repetition_penalty: > 1 discourages tokens already in the sequence (prompt included); 1 disables it.
        seed: seeds the sampling generator, so a run with the same inputs and seed is reproducible.
    """

    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        for flag, value in (("--temperature", self.temperature), ("--repetition-penalty", self.repetition_penalty),
                            ("--top-p", self.top_p)):
            if not math.isfinite(value):  # NaN passes every comparison below; sampling would then emit garbage
                raise ConfigError(f"{flag} must be a finite number (got {value})")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in [0, 1] (got {self.top_p})")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ConfigError(f"--top-k {self.top_k} and --top-p {self.top_p} are both non-zero; set one of them to 0")
        if self.temperature <= 0.0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature}); use --top-k 1 for greedy decoding")
        if self.repetition_penalty <= 0.0:
            raise ConfigError(f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); 1.0 disables it")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise, per row, every token id that occurs in ``seen``.

    Args:
        logits: (batch, vocab) float scores.
        seen: (batch, n) token ids already in each row's sequence (repeats allowed).
        penalty: > 1 makes seen tokens less likely.
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the row's k-th largest to -inf. (batch, vocab) -> (batch, vocab)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their probability mass reaches ``p`` (at least one token)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token: a token is dropped once the tokens ahead of it already cover p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row. (batch, vocab) float logits -> (batch,) int64 ids."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 1:
        logits = filter_top_k(logits, params.top_k)
    elif params.top_p > 0.0:
        logits = filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
