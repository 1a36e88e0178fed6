"""Mixtral (``MixtralForCausalLM``): llama's attention and norms; every layer a mixture of ``num_local_experts``
SwiGLU experts (``block_sparse_moe.experts.<e>.w1`` gate, ``w3`` up, ``w2`` down) of width ``intermediate_size``,
top ``num_experts_per_tok`` of a softmax, always renormalised (see ``moe.py``); no shared expert."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from . import llama
from .arch import ModelArch, llama_style_arch
from .moe import expert_rows, moe_fields
from .registry import ModelFamily, register_family


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError("Mixtral sliding-window attention is not supported; only full-attention configs "
                                    "convert (sliding_window null or >= max_position_embeddings)")
    moe = moe_fields(hf, num_experts=hf["num_local_experts"], moe_ffn=hf["intermediate_size"], renormalise=True)
    return llama_style_arch(hf, 32768, **moe)


def weight_mapping(arch: ModelArch) -> list:
    moe = "model.layers.*.block_sparse_moe"
    # llama's rows (its dense MLP rows place on no layer: every Mixtral layer is a MoE layer), then the experts.
    return llama.weight_mapping(arch) + expert_rows(
        f"{moe}.gate.weight", f"{moe}.experts.<e>.w1.weight", f"{moe}.experts.<e>.w3.weight",
        f"{moe}.experts.<e>.w2.weight")


def _mixtral(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, experts=8, topk=2, **extra):
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "initializer_range": 0.02, "sliding_window": None,
        "num_local_experts": experts, "num_experts_per_tok": topk, "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0, "bos_token_id": 1, "eos_token_id": 2, **extra,
    }


FLAVORS = {
    "tiny": _mixtral(2, 64, 64, 4, 2, 500, 512, experts=4),  # CPU / test preset
    "8x7B": _mixtral(32, 4096, 14336, 32, 8, 32000, 32768),
    "8x22B": _mixtral(56, 6144, 16384, 48, 8, 32768, 65536),
}

MIXTRAL = register_family(ModelFamily(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    ignored_hf_keys=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
))
