"""Checks applied to each tensor as a conversion or a load streams it: finite values, the exact set of names.

The non-finite check rides on the tensor a pipeline has just produced (still in cache), so it costs one reduction
per tensor and never a second pass over the checkpoint. A NaN or Inf weight is never what a user meant to ship:
it makes every logit NaN (generation then writes empty completions), so it is refused unless
``--allow-non-finite`` says otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from ..errors import CheckpointError
from .pieces import Pieces

ALLOW_NON_FINITE_FLAG = "--allow-non-finite"
EXTRA_STATE = "_extra_state"  # Transformer Engine's FP8 state: the only name allowed to be extra or missing


def is_finite(tensor: torch.Tensor) -> bool:
    """True when every element is finite. A NaN or Inf anywhere makes the sum non-finite, so a finite sum in the
    tensor's own dtype settles it without a temporary (a float64 sum first converts the whole tensor: twice its
    bytes); only a non-finite sum, which finite values can also reach by overflow, is checked element by element."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def all_finite(tensor: torch.Tensor | Pieces) -> bool:
    """``is_finite`` of a tensor or of every region of ``Pieces``."""
    return all(map(is_finite, tensor.regions() if isinstance(tensor, Pieces) else [tensor]))


class NonFiniteGuard:
    """Refuses (default) or, with ``allow``, warns once about tensors holding NaN or Inf.

    Args:
        what: the checkpoint or tool the message names (e.g. ``"hf2mcore input /data/llama"``).
        allow: warn once on stderr and continue instead of raising.
    """

    def __init__(self, what: str, allow: bool = False):
        self.what, self.allow, self.warned = what, allow, False

    def __call__(self, name: str, tensor: torch.Tensor | Pieces) -> None:
        """Check ``tensor`` (for ``Pieces``: the shard regions it is made of, where they lie)."""
        if all_finite(tensor):
            return
        values = tensor.regions() if isinstance(tensor, Pieces) else [tensor.detach()]
        nans = sum(int(torch.isnan(value).sum()) for value in values)
        infs = sum(int(torch.isinf(value).sum()) for value in values)
        found = f"{self.what}: tensor '{name}' holds {nans} NaN and {infs} Inf values"
        if not self.allow:
            raise CheckpointError(f"{found} (pass {ALLOW_NON_FINITE_FLAG} to continue anyway)")
        if not self.warned:
            self.warned = True
            print(f"warning: {found}; continuing because of {ALLOW_NON_FINITE_FLAG} (further non-finite tensors "
                  "are not reported)", file=sys.stderr)


def check_exact_names(stored: Iterable[str], expected: Iterable[str], where: str) -> None:
    """Refuse a tensor set that differs from ``expected`` in either direction (``_extra_state`` entries aside).

    Loading is strict: an unexpected tensor means the recorded configuration (layers, family, tied embeddings)
    does not describe the weights, and silently dropping it would export a different model.
    """
    stored = {n for n in stored if not n.endswith(EXTRA_STATE)}
    expected = {n for n in expected if not n.endswith(EXTRA_STATE)}
    problems = ((stored - expected, "holds tensors its recorded configuration does not have"),
                (expected - stored, "lacks tensors its recorded configuration needs"))
    for names, problem in problems:
        if names:
            listed = sorted(names)
            more = f" and {len(listed) - 3} more" if len(listed) > 3 else ""
            raise CheckpointError(f"{where} {problem}: {', '.join(listed[:3])}{more}")
