"""Qwen mixture-of-experts family: Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE
(``Qwen3MoeForCausalLM``).

What differs from the dense qwen models (``qwen.py``), whose attention rows these reuse:
  * MoE layers: a router (``mlp.gate``), ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, top
    ``num_experts_per_tok`` of a softmax, renormalised when ``norm_topk_prob`` (see ``moe.py``).
  * Qwen2-MoE: a shared expert (width ``shared_expert_intermediate_size``) added to every token's output, scaled by
    ``sigmoid(shared_expert_gate(x))`` (megatron-core's ``moe_shared_expert_gate``).
  * A layer is a MoE layer unless listed in ``mlp_only_layers`` or ``(layer + 1) % decoder_sparse_step != 0``;
    the others have a dense MLP of width ``intermediate_size``.
  * Qwen3-MoE: q/k RMSNorm and no q/k/v bias (as dense Qwen3), no shared expert.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from . import qwen
from .arch import ModelArch, llama_style_arch
from .moe import expert_rows, moe_fields, shared_expert_rows
from .registry import ModelFamily, register_family


def moe_layer_pattern(hf: dict) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, per layer (HF's rule)."""
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"])]


def arch_from_hf(hf: dict) -> ModelArch:
    if hf.get("use_sliding_window") and (hf.get("sliding_window") or 0) < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError("Qwen-MoE sliding-window attention (use_sliding_window) is not supported; "
                                    "only full-attention configs convert")
    qwen3 = hf.get("model_type") == "qwen3_moe"
    if qwen3 and hf.get("attention_bias"):
        raise UnsupportedModelError("Qwen3-MoE with attention_bias=true cannot be represented in megatron-core")
    shared = 0 if qwen3 else hf.get("shared_expert_intermediate_size") or 0
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; the hub's configs say num_experts.
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    moe = moe_fields(hf, num_experts=experts, moe_ffn=hf["moe_intermediate_size"],
                     renormalise=bool(hf.get("norm_topk_prob", False)), shared_ffn=shared,
                     moe_layers=moe_layer_pattern(hf))
    return llama_style_arch(hf, 32768, add_qkv_bias=not qwen3 and bool(hf.get("qkv_bias", True)),
                            qk_layernorm=qwen3, **moe)


def weight_mapping(arch: ModelArch) -> list:
    mlp = "model.layers.*.mlp"
    # Attention, norms and the dense MLP (on the dense layers) as in dense qwen; then the MoE layers' MLP.
    rows = qwen.weight_mapping(arch)
    rows += expert_rows(f"{mlp}.gate.weight", f"{mlp}.experts.<e>.gate_proj.weight",
                        f"{mlp}.experts.<e>.up_proj.weight", f"{mlp}.experts.<e>.down_proj.weight")
    if arch.moe_shared_expert_intermediate_size:
        rows += shared_expert_rows(f"{mlp}.shared_expert.gate_proj.weight", f"{mlp}.shared_expert.up_proj.weight",
                                   f"{mlp}.shared_expert.down_proj.weight", f"{mlp}.shared_expert_gate.weight")
    return rows


def _qwen2_moe(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, experts, topk, moe_ffn, shared_ffn,
               norm_topk_prob=False, **extra):
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "initializer_range": 0.02,
        "num_experts": experts, "num_experts_per_tok": topk, "moe_intermediate_size": moe_ffn,
        "shared_expert_intermediate_size": shared_ffn, "norm_topk_prob": norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "qkv_bias": True,
        "bos_token_id": 151643, "eos_token_id": 151643, **extra,
    }


def _qwen3_moe(layers, hidden, ffn, heads, kv_heads, head_dim, vocab, max_pos, experts, topk, moe_ffn, **extra):
    cfg = _qwen2_moe(layers, hidden, ffn, heads, kv_heads, vocab, max_pos, experts, topk, moe_ffn, 0,
                     norm_topk_prob=True, **extra)
    del cfg["shared_expert_intermediate_size"], cfg["qkv_bias"]
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=head_dim,
               attention_bias=False)
    return cfg


FLAVORS = {
    # CPU / test presets. tiny: 4 layers, layer 1 dense (mlp_only_layers), 4 experts top-2 with a gated shared
    # expert; vocab 500 is not a multiple of 128 (exercises padding).
    "tiny": _qwen2_moe(4, 64, 160, 4, 2, 500, 512, 4, 2, 32, 96, mlp_only_layers=[1],
                       bos_token_id=1, eos_token_id=2),
    "tiny-qwen3": _qwen3_moe(2, 64, 160, 4, 2, 32, 500, 512, 8, 2, 32, bos_token_id=1, eos_token_id=2),
    "qwen1.5-moe-a2.7B": _qwen2_moe(24, 2048, 5632, 16, 16, 151936, 8192, 60, 4, 1408, 5632),
    "qwen2-57B-a14B": _qwen2_moe(28, 3584, 18944, 28, 4, 151936, 131072, 64, 8, 2560, 20480),
    "qwen3-30B-a3B": _qwen3_moe(48, 2048, 6144, 32, 4, 128, 151936, 40960, 128, 8, 768),
    "qwen3-235B-a22B": _qwen3_moe(94, 4096, 12288, 64, 4, 128, 151936, 40960, 128, 8, 1536),
}

QWEN_MOE = register_family(ModelFamily(
    name="qwen_moe",
    architectures=("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"),
    model_types=("qwen2_moe", "qwen3_moe"),
    arch_from_hf=arch_from_hf,
    weight_mapping=weight_mapping,
    flavors=FLAVORS,
    ignored_hf_keys=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
))
