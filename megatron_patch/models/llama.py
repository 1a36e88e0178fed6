"""Llama family: Llama 1/2/3/3.1 and Mistral-style GQA (``LlamaForCausalLM``, ``MistralForCausalLM``)."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..mapping import QKV, Direct, GatedMLP, Split
from .arch import ModelArch, llama_style_arch
from .registry import ModelFamily, register_family


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("sliding_window") and hf.get("model_type") == "mistral":
        if hf["sliding_window"] < hf.get("max_position_embeddings", 0):
            raise UnsupportedModelError("Mistral sliding-window attention is not supported; only full-attention configs convert")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        # megatron-core ties the o_proj bias to the MLP biases (add_bias_linear); q/k/v-only bias is qwen2's layout.
        raise UnsupportedModelError(f"llama with attention_bias={attention_bias} and mlp_bias={mlp_bias} cannot be represented in "
                         "megatron-core (its output-projection bias comes with MLP biases); only equal values convert")
    return llama_style_arch(hf, 2048, add_qkv_bias=attention_bias, add_linear_bias=mlp_bias)


def weight_mapping(arch: ModelArch) -> list:
    attn, mlp = "model.layers.*.self_attn", "model.layers.*.mlp"
    rows = [
        Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", Split.VOCAB),
        Direct("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
        QKV("decoder.layers.*.self_attention.linear_qkv.weight",
            f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
        Direct("decoder.layers.*.self_attention.linear_proj.weight", f"{attn}.o_proj.weight", Split.ROW),
        Direct("decoder.layers.*.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight"),
        GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
        Direct("decoder.layers.*.mlp.linear_fc2.weight", f"{mlp}.down_proj.weight", Split.ROW),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct("output_layer.weight", "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight", Split.VOCAB),
    ]
    if arch.add_qkv_bias:
        rows.append(QKV("decoder.layers.*.self_attention.linear_qkv.bias",
                        f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"))
    if arch.add_linear_bias:
        rows.append(Direct("decoder.layers.*.self_attention.linear_proj.bias", f"{attn}.o_proj.bias", Split.REPLICATED))
        rows.append(GatedMLP("decoder.layers.*.mlp.linear_fc1.bias", f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"))
        rows.append(Direct("decoder.layers.*.mlp.linear_fc2.bias", f"{mlp}.down_proj.bias", Split.REPLICATED))
    return rows


def _llama(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, theta=10000.0, eps=1e-5, **extra):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rms_norm_eps": eps, "rope_theta": theta,
        "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, **extra,
    }


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

FLAVORS = {
    # CPU / test preset: GQA, head_dim 16, small enough to train on two cores.
    "tiny": _llama(4, 128, 344, 8, 4, 2000, 512, eps=1e-6),
    "7B": _llama(32, 4096, 11008, 32, 32, 32000, 4096),
    "13B": _llama(40, 5120, 13824, 40, 40, 32000, 4096),
    "70B": _llama(80, 8192, 28672, 64, 8, 32000, 4096),
    "llama3-8B": _llama(32, 4096, 14336, 32, 8, 128256, 8192, theta=500000.0,
                        bos_token_id=128000, eos_token_id=128001),
    "llama3.1-8B": _llama(32, 4096, 14336, 32, 8, 128256, 131072, theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                          bos_token_id=128000, eos_token_id=128001),
    "llama3-70B": _llama(80, 8192, 28672, 64, 8, 128256, 8192, theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001),
}

LLAMA = register_family(ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "mistral"),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    ignored_hf_keys=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
))
