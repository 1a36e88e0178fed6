"""Independent reference forward passes for remote-code models that transformers does not ship (Baichuan, Qwen v1).

Written from the published architectures, sharing nothing with megatron_patch, so they can catch its mistakes.
Each module offers ``random_checkpoint(config, seed)`` (tensors in the original names and layout) and
``forward(tensors, config, tokens)`` -> logits (batch, seq, vocab) in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_hf_dir(out_dir, config: dict, tensors: dict) -> str:
    """Write ``config.json`` + ``model.safetensors`` as a remote-code HF repository holds them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x, base):
    """x: (batch, heads, seq, head_dim); GPT-NeoX-style rotary over the whole head (rotate-half)."""
    dim, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def causal_attention(q, k, v, bias=None):
    """q, k, v: (batch, heads, seq, head_dim); bias: (heads, seq, seq) added before the causal mask."""
    seq, dim = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    if bias is not None:
        scores = scores + bias
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def heads_first(x, heads):
    """(batch, seq, heads * d) -> (batch, heads, seq, d)."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


def heads_last(x):
    batch, heads, seq, dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * dim)


def randn(generator, *shape, std=0.02):
    return torch.randn(*shape, generator=generator) * std


def norm_weight(generator, size):
    """Norm weights near 1 but not 1, so a misplaced norm cannot hide."""
    return 1.0 + torch.randn(size, generator=generator) * 0.1
