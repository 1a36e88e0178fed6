"""Qwen (v1, ``QWenLMHeadModel``) as published (``modeling_qwen.py`` of the Qwen-7B hub repository), for
sequences within ``seq_length`` (where its dynamic NTK and log-n scaling are inactive).

Names: ``transformer.wte``, per block ``ln_1`` -> ``attn`` (``c_attn`` = [q; k; v] with bias, rotary over the whole
head, ``c_proj`` without bias) -> residual, ``ln_2`` -> ``mlp`` (``c_proj(w1(x) * silu(w2(x)))``, no biases) ->
residual; ``transformer.ln_f``, ``lm_head``. ``intermediate_size`` is twice the width of w1 / w2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import apply_rope, causal_attention, heads_first, heads_last, norm_weight, randn, rms_norm


def random_checkpoint(config: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, vocab = config["hidden_size"], config["vocab_size"]
    proj = config["kv_channels"] * config["num_attention_heads"]
    ffn = config["intermediate_size"] // 2
    tensors = {"transformer.wte.weight": randn(g, vocab, h), "transformer.ln_f.weight": norm_weight(g, h),
               "lm_head.weight": randn(g, vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        tensors.update({
            p + "ln_1.weight": norm_weight(g, h),
            p + "attn.c_attn.weight": randn(g, 3 * proj, h),
            p + "attn.c_attn.bias": randn(g, 3 * proj, std=0.1),
            p + "attn.c_proj.weight": randn(g, h, proj),
            p + "ln_2.weight": norm_weight(g, h),
            p + "mlp.w1.weight": randn(g, ffn, h),
            p + "mlp.w2.weight": randn(g, ffn, h),
            p + "mlp.c_proj.weight": randn(g, h, ffn),
        })
    return tensors


def forward(tensors: dict, config: dict, tokens: torch.Tensor) -> torch.Tensor:
    heads, eps = config["num_attention_heads"], config["layer_norm_epsilon"]
    proj = config["kv_channels"] * heads
    base = float(config["rotary_emb_base"])
    x = F.embedding(tokens, tensors["transformer.wte.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        y = rms_norm(x, tensors[p + "ln_1.weight"], eps)
        mixed = F.linear(y, tensors[p + "attn.c_attn.weight"], tensors[p + "attn.c_attn.bias"])
        q, k, v = (heads_first(t, heads) for t in mixed.split(proj, dim=-1))
        q, k = apply_rope(q, base), apply_rope(k, base)
        x = x + F.linear(heads_last(causal_attention(q, k, v)), tensors[p + "attn.c_proj.weight"])
        y = rms_norm(x, tensors[p + "ln_2.weight"], eps)
        inner = F.linear(y, tensors[p + "mlp.w1.weight"]) * F.silu(F.linear(y, tensors[p + "mlp.w2.weight"]))
        x = x + F.linear(inner, tensors[p + "mlp.c_proj.weight"])
    x = rms_norm(x, tensors["transformer.ln_f.weight"], eps)
    return F.linear(x, tensors["lm_head.weight"]).float()
