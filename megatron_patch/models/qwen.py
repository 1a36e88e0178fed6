"""Qwen family: Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``), Qwen3 dense (``Qwen3ForCausalLM``) and Qwen v1
(``QWenLMHeadModel``, remote code, ``model_type`` ``qwen``).

What differs from llama:
  * Qwen2: bias on q/k/v only.
  * Qwen3: per-head RMSNorm on q and k before RoPE (megatron-core's ``qk_layernorm``); explicit ``head_dim``.
  * Qwen v1: other tensor names; ``attn.c_attn`` fuses [q; k; v] blocks (with bias); ``intermediate_size`` is
    twice the FFN width; the MLP is ``c_proj(w1(x) * silu(w2(x)))``, so ``w2`` is the SwiGLU gate.
    Its dynamic-NTK RoPE and log-n attention scaling act only beyond ``seq_length`` tokens; within it the model
    is the plain one converted here, so ``max_position_embeddings`` is set to ``seq_length``.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..mapping import Direct, FusedQKV, GatedMLP, Split
from . import llama
from .arch import ModelArch, hf_dtype, llama_style_arch
from .registry import ModelFamily, register_family

QWEN1 = "qwen"  # model_type of Qwen v1; its layout is recorded in ModelArch.extras["hf_layout"]


def _qwen2_arch(hf: dict) -> ModelArch:
    if hf.get("use_sliding_window") and hf.get("sliding_window", 0) < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError("Qwen sliding-window attention (use_sliding_window) is not supported; "
                         "only full-attention configs convert")
    is_qwen3 = hf.get("model_type") == "qwen3"
    if is_qwen3 and hf.get("attention_bias"):
        # megatron-core can bias q/k/v alone, but an o_proj bias would come with MLP biases.
        raise UnsupportedModelError("Qwen3 with attention_bias=true cannot be represented in megatron-core")
    return llama_style_arch(hf, 32768, add_qkv_bias=not is_qwen3, qk_layernorm=is_qwen3)


def _qwen1_arch(hf: dict) -> ModelArch:
    if hf.get("rotary_pct", 1.0) != 1.0:
        raise UnsupportedModelError(f"Qwen (v1) with rotary_pct={hf['rotary_pct']} is not supported (only 1.0)")
    if not hf.get("no_bias", True):
        raise UnsupportedModelError("Qwen (v1) with no_bias=false is not supported (published checkpoints use no_bias=true)")
    if hf["intermediate_size"] % 2:
        raise UnsupportedModelError(f"Qwen (v1) intermediate_size {hf['intermediate_size']} must be even (it is 2 x FFN width)")
    heads = hf["num_attention_heads"]
    return ModelArch(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"] // 2,
        num_attention_heads=heads,
        num_query_groups=heads,
        head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("seq_length") or hf.get("max_position_embeddings", 8192),
        normalization="RMSNorm",
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        add_qkv_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(hf.get("rotary_emb_base", 10000.0)),
        init_std=hf.get("initializer_range", 0.02),
        dtype=hf_dtype(hf),
        extras={"hf_layout": QWEN1},
    )


def arch_from_hf(hf: dict) -> ModelArch:
    return _qwen1_arch(hf) if hf.get("model_type") == QWEN1 else _qwen2_arch(hf)


def _qwen1_mapping(arch: ModelArch) -> list:
    layer, attn, mlp = "transformer.h.*", "transformer.h.*.attn", "transformer.h.*.mlp"
    return [
        Direct("embedding.word_embeddings.weight", "transformer.wte.weight", Split.VOCAB),
        Direct("decoder.layers.*.input_layernorm.weight", f"{layer}.ln_1.weight"),
        FusedQKV("decoder.layers.*.self_attention.linear_qkv.weight", f"{attn}.c_attn.weight"),
        FusedQKV("decoder.layers.*.self_attention.linear_qkv.bias", f"{attn}.c_attn.bias"),
        Direct("decoder.layers.*.self_attention.linear_proj.weight", f"{attn}.c_proj.weight", Split.ROW),
        Direct("decoder.layers.*.pre_mlp_layernorm.weight", f"{layer}.ln_2.weight"),
        # output = c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
        GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", gate=f"{mlp}.w2.weight", up=f"{mlp}.w1.weight"),
        Direct("decoder.layers.*.mlp.linear_fc2.weight", f"{mlp}.c_proj.weight", Split.ROW),
        Direct("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
        Direct("output_layer.weight", "transformer.wte.weight" if arch.tie_word_embeddings else "lm_head.weight",
               Split.VOCAB),
    ]


def weight_mapping(arch: ModelArch) -> list:
    if arch.extras.get("hf_layout") == QWEN1:
        return _qwen1_mapping(arch)
    # Qwen2/3 use llama's tensor names; qwen2's q/k/v biases are llama's attention-bias rows.
    rows = llama.weight_mapping(arch)
    if arch.qk_layernorm:
        attn = "model.layers.*.self_attn"
        rows += [Direct("decoder.layers.*.self_attention.q_layernorm.weight", f"{attn}.q_norm.weight", Split.REPLICATED),
                 Direct("decoder.layers.*.self_attention.k_layernorm.weight", f"{attn}.k_norm.weight", Split.REPLICATED)]
    return rows


def _qwen2(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, tie=False, theta=1000000.0, **extra):
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": theta, "hidden_act": "silu",
        "tie_word_embeddings": tie, "use_sliding_window": False, "initializer_range": 0.02,
        "bos_token_id": 151643, "eos_token_id": 151643, **extra,
    }


def _qwen3(layers, hidden, ffn, heads, kv_heads, head_dim, vocab, max_pos, tie=False, **extra):
    cfg = _qwen2(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, tie, **extra)
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim, attention_bias=False)
    return cfg


def _qwen1(layers, hidden, intermediate, heads, vocab, seq_length, **extra):
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": QWEN1,
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads, "kv_channels": hidden // heads, "vocab_size": vocab,
        "seq_length": seq_length, "max_position_embeddings": seq_length, "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True, "scale_attn_weights": True,
        "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False, "initializer_range": 0.02,
        **extra,
    }


FLAVORS = {
    # CPU / test presets: GQA 4 heads / 2 groups; vocab 500 is not a multiple of 128 (exercises padding).
    "tiny": _qwen2(2, 64, 160, 4, 2, 500, 512, bos_token_id=1, eos_token_id=2),
    "tiny-qwen3": _qwen3(2, 64, 160, 4, 2, 32, 500, 512, bos_token_id=1, eos_token_id=2),  # head_dim 32 != hidden / heads
    "tiny-qwen1": _qwen1(2, 64, 320, 4, 500, 512),  # intermediate_size 320 -> FFN width 160
    "qwen2.5-0.5B": _qwen2(24, 896, 4864, 14, 2, 151936, 32768, tie=True),
    "qwen2.5-7B": _qwen2(28, 3584, 18944, 28, 4, 152064, 32768),
    "qwen2.5-72B": _qwen2(80, 8192, 29568, 64, 8, 152064, 32768),
    "qwen3-8B": _qwen3(36, 4096, 12288, 32, 8, 128, 151936, 40960),
    "qwen-7B": _qwen1(32, 4096, 22016, 32, 151936, 8192),
}

QWEN = register_family(ModelFamily(
    name="qwen",
    architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM", "QWenLMHeadModel"),
    model_types=("qwen2", "qwen3", QWEN1),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    ignored_hf_keys=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"transformer\.rotary_emb\.inv_freq"),
))
