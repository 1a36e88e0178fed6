"""LoRA adapters (layers/lora.py): the settings refused before work, the adapted forward equal to the merged weight,
the base back with the adapters disabled, only adapters trainable."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.errors import ConfigError
from megatron_patch.layers.lora_config import TARGET_MODULES, LoRAConfig, full_adapter_init, layer_shapes
from megatron_patch.layers.vocab_padding import padded_column_mask
from megatron_patch.models import get_family
from megatron_patch.models.spec import ModelSpec
from tests.layers.in_rank import in_rank


@pytest.mark.parametrize("config,message", [
    (LoRAConfig(0, 8.0), "--lora-rank must be >= 1"),
    (LoRAConfig(4, 0.0), "--lora-alpha must be a positive number"),
    (LoRAConfig(4, 8.0, dropout=1.0), "--lora-dropout must be in [0, 1)"),
    (LoRAConfig(4, 8.0, target_modules=("linear_qkv", "q_proj")), "unknown q_proj"),
    (LoRAConfig(4, 8.0, target_modules=("linear_qkv", "linear_qkv")), "lists a module twice"),
])
def test_bad_settings_refused(config, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.validate()


def test_rank_larger_than_a_layer_refused():
    arch = ModelSpec.from_flavor("llama", "tiny", tp=1).arch
    shapes = layer_shapes(arch)
    assert shapes["linear_qkv"] == (128 + 2 * 4 * 16, 128) and shapes["linear_fc2"] == (128, 344)
    LoRAConfig(128, 8.0).validate().check_shapes(shapes)
    with pytest.raises(ConfigError, match="--lora-rank 129 is larger than linear_qkv .*use at most 128"):
        LoRAConfig(129, 8.0).validate().check_shapes(shapes)
    with pytest.raises(ConfigError, match="linear_fc1"):  # (688, 128): its input is the bound
        LoRAConfig(129, 8.0, target_modules=("linear_fc1",)).validate().check_shapes(shapes)


def test_training_flags_refused_before_work():
    from megatron_patch.training.arguments import TrainConfig

    base = dict(mode="finetune", train_data_path="x.jsonl", load="ckpt")
    TrainConfig(**base, lora_rank=4).validate()
    for extra, message in [
        (dict(lora_rank=4, transformer_impl="transformer_engine"), "--lora-rank needs --transformer-impl local"),
        (dict(lora_rank=4, transformer_impl="transformer_engine", bf16=True, fp8_format="hybrid"),
         "--lora-rank does not support --fp8-format"),
        (dict(lora_target_modules=["linear_qkv"]), "--lora-target-modules needs --lora-rank"),
        (dict(lora_rank=4, lora_target_modules=["mlp"]), "unknown mlp"),
        (dict(lora_rank=-1), "--lora-rank must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{**base, **extra}).validate()
    with pytest.raises(ConfigError, match="--lora-rank needs --load"):
        TrainConfig(mode="finetune", train_data_path="x.jsonl", model_name="llama", model_size="tiny",
                    tokenizer_model="tok", lora_rank=4).validate()


def test_adapter_init_depends_only_on_the_name():
    a1, b1 = full_adapter_init("decoder.layers.3.self_attention.linear_qkv.lora", 4, 32, 48, seed=7)
    a2, _ = full_adapter_init("decoder.layers.3.self_attention.linear_qkv.lora", 4, 32, 48, seed=7)
    a3, _ = full_adapter_init("decoder.layers.2.self_attention.linear_qkv.lora", 4, 32, 48, seed=7)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3) and not b1.any()
    assert a1.abs().max() <= 1 / 32**0.5


def test_padded_column_mask():
    assert padded_column_mask(1024, 0, 2000) is None
    mask = padded_column_mask(1024, 1, 2000)
    assert mask.sum() == 48 and not mask[: 2000 - 1024].any() and mask[2000 - 1024:].all()


@in_rank
def test_adapted_forward_is_the_merged_weight():
    from megatron_patch.layers.lora import adapters_disabled, lora_adapters, without_adapters
    from megatron_patch.models.builder import build_model

    spec = ModelSpec.from_hf_config(get_family("qwen").flavor("tiny"), tp=1)  # qkv biases
    torch.manual_seed(0)
    plain = build_model(spec.arch, spec.padded_vocab_size, parallel_output=False)
    lora = LoRAConfig(4, 8.0, target_modules=TARGET_MODULES).validate()
    adapted = build_model(spec.arch, spec.padded_vocab_size, parallel_output=False, lora=lora)
    with without_adapters(adapted):
        adapted.load_state_dict(plain.state_dict(), strict=True)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in name for name in trainable)
    assert len(trainable) == 2 * len(TARGET_MODULES) * spec.arch.num_layers
    tokens = torch.randint(0, 400, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    adapted.eval()
    plain.eval()
    with torch.no_grad():
        base = plain(tokens, positions, None)
        for _, adapter in lora_adapters(adapted):
            adapter.weight_b.normal_()
        merged = dict(plain.named_parameters())
        for name, adapter in lora_adapters(adapted):
            merged[name.removesuffix(".lora") + ".weight"].add_(adapter.delta())
        ours = adapted(tokens, positions, None)
        assert (ours - plain(tokens, positions, None)).abs().max() <= 1e-4
        assert (ours - base).abs().max() > 1e-2  # the adapters change the output
        with adapters_disabled(adapted):
            assert (adapted(tokens, positions, None) - base).abs().max() <= 1e-5
