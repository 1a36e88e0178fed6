"""RoPE inverse frequencies as HuggingFace computes them, for megatron-core's ``RotaryEmbedding``.

megatron-core's GPTModel exposes only llama-3 scaling with a fixed factor set (low 1, high 4, original context
8192); HF configs carry their own values. The frequencies are computed here from the config and set on the
model's rotary module after construction, before its first forward (its output is memoised per length).
"""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(scaling: dict | None) -> None:
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, shape (head_dim // 2,), float32."""
    check_rope_scaling(scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, interpolate smoothly in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > context / low
    short_wave = wavelen < context / high
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    return torch.where(~long_wave & ~short_wave, blended, scaled)


def set_rope_inv_freq(model: torch.nn.Module, inv_freq: torch.Tensor) -> None:
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("model has no rotary_pos_emb to set frequencies on")
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
