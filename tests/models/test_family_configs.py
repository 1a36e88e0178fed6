"""Family detection, config facts and the one-line refusals of what cannot be represented (no model is built)."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.convert.plan import ConversionPlan
from megatron_patch.mapping import FusedQKV, PerHeadQKV, layouts
from megatron_patch.models import detect_family, get_family
from megatron_patch.models.spec import ModelSpec


@pytest.mark.parametrize("family,flavor", [
    ("qwen", "tiny"), ("qwen", "tiny-qwen3"), ("qwen", "tiny-qwen1"), ("qwen", "qwen2.5-7B"), ("qwen", "qwen3-8B"),
    ("qwen", "qwen-7B"), ("baichuan", "tiny"), ("baichuan", "13B"), ("baichuan", "baichuan2-13B"),
    ("bloom", "tiny"), ("bloom", "7b1"),
])
def test_family_detected_from_config(family, flavor):
    assert detect_family(get_family(family).flavor(flavor)).name == family


def test_detected_by_model_type_alone():
    assert detect_family({"model_type": "qwen"}).name == "qwen"
    assert detect_family({"model_type": "baichuan"}).name == "baichuan"


@pytest.mark.parametrize("flavor,alibi,norm_head", [
    ("7B", False, False), ("13B", True, False), ("baichuan2-7B", False, True), ("baichuan2-13B", True, True),
])
def test_baichuan_variant_rules(flavor, alibi, norm_head):
    family = get_family("baichuan")
    arch = family.arch_from_hf(family.flavor(flavor))
    assert (arch.position_embedding == "alibi") == alibi and arch.norm_head == norm_head


def test_qwen_facts():
    qwen = get_family("qwen")
    qwen2 = qwen.arch_from_hf(qwen.flavor("qwen2.5-7B"))
    assert qwen2.add_qkv_bias and not qwen2.add_linear_bias and not qwen2.qk_layernorm
    qwen3 = qwen.arch_from_hf(qwen.flavor("qwen3-8B"))
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and qwen3.head_dim == 128
    qwen1 = qwen.arch_from_hf(qwen.flavor("qwen-7B"))
    assert qwen1.ffn_hidden_size == 11008 and qwen1.add_qkv_bias


def test_bloom_facts():
    bloom = get_family("bloom")
    arch = bloom.arch_from_hf(bloom.flavor("560m"))
    assert (arch.normalization, arch.position_embedding, arch.ffn_hidden_size) == ("LayerNorm", "alibi", 4096)
    assert arch.embedding_norm and arch.tie_word_embeddings and not arch.gated_linear_unit
    # Older bloom configs spell the hidden size n_embed.
    legacy = {k: v for k, v in bloom.flavor("560m").items() if k != "hidden_size"}
    assert bloom.arch_from_hf({**legacy, "n_embed": 1024}).hidden_size == 1024


@pytest.mark.parametrize("family,flavor,change,message", [
    ("qwen", "tiny-qwen1", {"rotary_pct": 0.5}, "rotary_pct"),
    ("qwen", "tiny-qwen1", {"no_bias": False}, "no_bias"),
    ("qwen", "tiny-qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen", "tiny", {"use_sliding_window": True, "sliding_window": 128}, "sliding-window"),
    ("bloom", "tiny", {"apply_residual_connection_post_layernorm": True}, "post_layernorm"),
    ("baichuan", "tiny", {"position_embedding": "learned"}, "rope or alibi"),
])
def test_unrepresentable_configs_are_refused(family, flavor, change, message):
    fam = get_family(family)
    with pytest.raises(ValueError, match=message):
        fam.arch_from_hf({**fam.flavor(flavor), **change})


@pytest.mark.parametrize("family,flavor,tp", [("bloom", "tiny", 4), ("baichuan", "tiny-13b", 4), ("qwen", "tiny", 4)])
def test_tp_not_dividing_heads_is_refused(family, flavor, tp):
    fam = get_family(family)
    with pytest.raises(ValueError, match=f"--tp {tp} does not divide"):
        ConversionPlan(ModelSpec.from_hf_config(fam.flavor(flavor), tp=tp, family=fam), tp=tp, pp=1)


# --- fused q/k/v rows: pure transforms with exact inverses ---------------------------------------------------------


class _Arch:
    def __init__(self, heads, groups):
        self.num_attention_heads, self.num_query_groups = heads, groups


@pytest.mark.parametrize("heads,groups,tail", [(6, 6, (8,)), (8, 2, (8,)), (4, 4, ()), (4, 1, ())])
def test_fused_qkv_blocks_round_trip(heads, groups, tail):
    d = 3
    q, k, v = torch.randn(heads * d, *tail), torch.randn(groups * d, *tail), torch.randn(groups * d, *tail)
    row, arch = FusedQKV("m", "h"), _Arch(heads, groups)
    fused = torch.cat([q, k, v])
    megatron = row.hf_to_megatron([fused], arch)
    assert torch.equal(megatron, layouts.interleave_qkv(q, k, v, groups))
    assert torch.equal(row.megatron_to_hf(megatron, arch)[0], fused)


@pytest.mark.parametrize("tail", [(8,), ()])
def test_bloom_per_head_layout_is_megatron_layout(tail):
    heads, d = 6, 4
    fused = torch.randn(heads * 3 * d, *tail)
    row, arch = PerHeadQKV("m", "h"), _Arch(heads, heads)
    megatron = row.hf_to_megatron([fused], arch)
    # Per-head (q, k, v) is megatron-core's per-group order when every head is its own group.
    assert torch.equal(megatron, fused)
    per_head = fused.reshape(heads, 3, d, *tail)
    assert torch.equal(megatron, layouts.interleave_qkv(per_head[:, 0].reshape(-1, *tail),
                                                        per_head[:, 1].reshape(-1, *tail),
                                                        per_head[:, 2].reshape(-1, *tail), heads))
    assert torch.equal(row.megatron_to_hf(megatron, arch)[0], fused)


def test_per_head_layout_refuses_shared_kv_heads():
    with pytest.raises(ValueError, match="one key/value head per query head"):
        PerHeadQKV("m", "h").hf_to_megatron([torch.zeros(24, 8)], _Arch(4, 2))
