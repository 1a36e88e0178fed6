"""Bloom family (``BloomForCausalLM``: bloom-560m ... bloom-7b1, bloomz).

What differs from llama: LayerNorm with bias everywhere, a LayerNorm right after the word embedding
(``layers/embedding_norm.py``), a GeLU (tanh) MLP with biases, ``query_key_value`` fused per head as (q, k, v)
with bias, ALiBi instead of RoPE (``layers/alibi.py``), and the output layer tied to the word embedding.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..mapping import Direct, PerHeadQKV, Split
from .arch import ModelArch, hf_dtype
from .registry import ModelFamily, register_family


def _get(hf: dict, *names):
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise UnsupportedModelError(f"bloom config.json has none of {', '.join(names)}")


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError("bloom with apply_residual_connection_post_layernorm=true is not supported")
    hidden = _get(hf, "hidden_size", "n_embed")
    heads = _get(hf, "n_head", "num_attention_heads")
    return ModelArch(
        num_layers=_get(hf, "n_layer", "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        head_dim=hidden // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("seq_length", 2048),
        normalization="LayerNorm",
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        gated_linear_unit=False,
        add_qkv_bias=True,
        add_linear_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        position_embedding="alibi",
        embedding_norm=True,
        init_std=hf.get("initializer_range", 0.02),
        dtype=hf_dtype(hf),
    )


def weight_mapping(arch: ModelArch) -> list:
    layer, attn, mlp = "transformer.h.*", "transformer.h.*.self_attention", "transformer.h.*.mlp"
    rows = [
        Direct("embedding.word_embeddings.weight", "transformer.word_embeddings.weight", Split.VOCAB),
        Direct("output_layer.weight",
               "transformer.word_embeddings.weight" if arch.tie_word_embeddings else "lm_head.weight", Split.VOCAB),
        Direct("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
        Direct("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
    ]
    for kind in ("weight", "bias"):
        rows += [
            Direct(f"embedding.word_embeddings_layernorm.{kind}", f"transformer.word_embeddings_layernorm.{kind}"),
            Direct(f"decoder.layers.*.input_layernorm.{kind}", f"{layer}.input_layernorm.{kind}"),
            PerHeadQKV(f"decoder.layers.*.self_attention.linear_qkv.{kind}", f"{attn}.query_key_value.{kind}"),
            Direct(f"decoder.layers.*.self_attention.linear_proj.{kind}", f"{attn}.dense.{kind}",
                   Split.ROW if kind == "weight" else Split.REPLICATED),
            Direct(f"decoder.layers.*.pre_mlp_layernorm.{kind}", f"{layer}.post_attention_layernorm.{kind}"),
            Direct(f"decoder.layers.*.mlp.linear_fc1.{kind}", f"{mlp}.dense_h_to_4h.{kind}", Split.COLUMN),
            Direct(f"decoder.layers.*.mlp.linear_fc2.{kind}", f"{mlp}.dense_4h_to_h.{kind}",
                   Split.ROW if kind == "weight" else Split.REPLICATED),
        ]
    return rows


def _bloom(layers, hidden, heads, vocab=250880, **extra):
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "n_layer": layers, "hidden_size": hidden, "n_head": heads, "vocab_size": vocab,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "tie_word_embeddings": True, **extra,
    }


FLAVORS = {
    # CPU / test preset: 6 heads (not a power of two, so the ALiBi slopes take their interleaved branch).
    "tiny": _bloom(2, 96, 6, vocab=500),
    "560m": _bloom(24, 1024, 16),
    "1b1": _bloom(24, 1536, 16),
    "1b7": _bloom(24, 2048, 16),
    "3b": _bloom(30, 2560, 32),
    "7b1": _bloom(30, 4096, 32),
}

BLOOM = register_family(ModelFamily(
    name="bloom",
    architectures=("BloomForCausalLM",),
    model_types=("bloom",),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    # save_pretrained may or may not write the tied duplicate; it holds no weights of its own.
    ignored_hf_keys=(r"lm_head\.weight",),
    optional_hf_prefix="transformer.",  # the bigscience repositories were saved from BloomModel
))
