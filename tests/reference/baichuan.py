"""Baichuan 1/2, 7B (RoPE) and 13B (ALiBi), as published (``modeling_baichuan.py`` of each hub repository).

Llama-like decoder: RMSNorm pre-norm, SwiGLU MLP (gate_proj, up_proj, down_proj), no biases, attention with a
fused ``W_pack`` = [q; k; v] projection. 7B: rotary embeddings. 13B: no rotary; ALiBi bias ``slope_h * j`` for key j
(causal), slopes from ``_get_interleave``. Baichuan2: ``lm_head`` is a NormHead (rows L2-normalised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import apply_rope, causal_attention, heads_first, heads_last, norm_weight, randn, rms_norm


def interleave_slopes(n: int) -> list[float]:
    """Baichuan-13B's ``_get_interleave``: ALiBi slopes for n heads (recursive for n not a power of two)."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + interleave_slopes(2 * closest)[0::2][: n - closest]


def random_checkpoint(config: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": randn(g, vocab, h), "model.norm.weight": norm_weight(g, h),
               "lm_head.weight": randn(g, vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm_weight(g, h),
            p + "self_attn.W_pack.weight": randn(g, 3 * h, h),
            p + "self_attn.o_proj.weight": randn(g, h, h),
            p + "post_attention_layernorm.weight": norm_weight(g, h),
            p + "mlp.gate_proj.weight": randn(g, ffn, h),
            p + "mlp.up_proj.weight": randn(g, ffn, h),
            p + "mlp.down_proj.weight": randn(g, h, ffn),
        })
    return tensors


def forward(tensors: dict, config: dict, tokens: torch.Tensor, *, alibi: bool, norm_head: bool) -> torch.Tensor:
    h, heads, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    seq = tokens.shape[1]
    x = F.embedding(tokens, tensors["model.embed_tokens.weight"])
    bias = None
    if alibi:
        slopes = torch.tensor(interleave_slopes(heads))
        bias = slopes[:, None, None] * torch.arange(seq).float()[None, None, :]  # (heads, 1, seq) -> broadcast
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, tensors[p + "input_layernorm.weight"], eps)
        q, k, v = F.linear(y, tensors[p + "self_attn.W_pack.weight"]).split(h, dim=-1)
        q, k, v = heads_first(q, heads), heads_first(k, heads), heads_first(v, heads)
        if not alibi:
            q, k = apply_rope(q, 10000.0), apply_rope(k, 10000.0)
        x = x + F.linear(heads_last(causal_attention(q, k, v, bias)), tensors[p + "self_attn.o_proj.weight"])
        y = rms_norm(x, tensors[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(F.linear(y, tensors[p + "mlp.gate_proj.weight"]))
        x = x + F.linear(gate * F.linear(y, tensors[p + "mlp.up_proj.weight"]), tensors[p + "mlp.down_proj.weight"])
    x = rms_norm(x, tensors["model.norm.weight"], eps)
    head = tensors["lm_head.weight"]
    if norm_head:
        head = head / head.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return F.linear(x, head).float()
