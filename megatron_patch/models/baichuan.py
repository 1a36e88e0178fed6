"""Baichuan family (remote code, ``model_type`` ``baichuan``): Baichuan-7B and Baichuan2-7B (RoPE), Baichuan-13B
and Baichuan2-13B (ALiBi).

Llama's layout and names, with these differences:
  * ``self_attn.W_pack`` fuses q, k, v as three blocks [q; k; v] (no GQA, no biases);
  * the 13B models use ALiBi and no RoPE. Their published ``config.json`` files say so only by what they lack:
    the 7B configs carry ``max_position_embeddings``, the 13B ones only ``model_max_length``; that is the rule
    used here (a ``"position_embedding": "rope" | "alibi"`` key, if present, overrides it);
  * Baichuan2 uses NormHead (``lm_head`` rows L2-normalised in the forward pass). Baichuan2 configs are told
    apart by ``z_loss_weight`` or their 125,696-token vocabulary; a ``"norm_head": true | false`` key, if
    present, overrides that. Exported configs keep every original key, so the rule survives a round trip.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..mapping import QKV, FusedQKV
from . import llama
from .arch import ModelArch, hf_dtype
from .registry import ModelFamily, register_family

BAICHUAN2_VOCAB = 125696


def uses_alibi(hf: dict) -> bool:
    if "position_embedding" in hf:
        if hf["position_embedding"] not in ("rope", "alibi"):
            raise UnsupportedModelError(f"baichuan position_embedding must be rope or alibi (got {hf['position_embedding']})")
        return hf["position_embedding"] == "alibi"
    return "max_position_embeddings" not in hf


def uses_norm_head(hf: dict) -> bool:
    if "norm_head" in hf:
        return bool(hf["norm_head"])
    return "z_loss_weight" in hf or hf["vocab_size"] == BAICHUAN2_VOCAB


def arch_from_hf(hf: dict) -> ModelArch:
    heads = hf["num_attention_heads"]
    alibi = uses_alibi(hf)
    return ModelArch(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=heads,
        head_dim=hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings") or hf.get("model_max_length", 4096),
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        position_embedding="alibi" if alibi else "rope",
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_head=uses_norm_head(hf),
        init_std=hf.get("initializer_range", 0.02),
        dtype=hf_dtype(hf),
    )


def weight_mapping(arch: ModelArch) -> list:
    """Llama's table with the q/k/v row replaced by the fused ``W_pack``."""
    rows = [row for row in llama.weight_mapping(arch) if not isinstance(row, QKV)]
    rows.append(FusedQKV("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.W_pack.weight"))
    return rows


def _baichuan(layers, hidden, ffn, heads, vocab, max_len, alibi, baichuan2, architecture="BaichuanForCausalLM"):
    cfg = {
        "architectures": [architecture], "model_type": "baichuan",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "vocab_size": vocab, "model_max_length": max_len,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    if not alibi:
        cfg["max_position_embeddings"] = max_len
    if baichuan2:
        cfg["z_loss_weight"] = 0
    return cfg


FLAVORS = {
    # CPU / test presets. 6 heads (not a power of two) so the ALiBi slopes take their interleaved branch.
    "tiny": _baichuan(2, 96, 160, 6, 500, 512, alibi=False, baichuan2=False, architecture="BaiChuanForCausalLM"),
    "tiny-baichuan2": _baichuan(2, 96, 160, 6, 500, 512, alibi=False, baichuan2=True),
    "tiny-13b": _baichuan(2, 96, 160, 6, 500, 512, alibi=True, baichuan2=False),
    "tiny-baichuan2-13b": _baichuan(2, 96, 160, 6, 500, 512, alibi=True, baichuan2=True),
    "7B": _baichuan(32, 4096, 11008, 32, 64000, 4096, alibi=False, baichuan2=False,
                    architecture="BaiChuanForCausalLM"),
    "13B": _baichuan(40, 5120, 13696, 40, 64000, 4096, alibi=True, baichuan2=False),
    "baichuan2-7B": _baichuan(32, 4096, 11008, 32, BAICHUAN2_VOCAB, 4096, alibi=False, baichuan2=True),
    "baichuan2-13B": _baichuan(40, 5120, 13696, 40, BAICHUAN2_VOCAB, 4096, alibi=True, baichuan2=True),
}

BAICHUAN = register_family(ModelFamily(
    name="baichuan",
    architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"),
    model_types=("baichuan",),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    ignored_hf_keys=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
))
