"""Typed config validation, FP8 / TE flags reaching the TransformerConfig, and refusal on a machine without them."""

from __future__ import annotations

import pytest

from megatron_patch.training.arguments import TrainConfig


def pretrain_cfg(**kw) -> TrainConfig:
    base = dict(mode="pretrain", model_name="llama", model_size="tiny", tokenizer_model="tok", data_path=["d"],
                train_iters=10)
    return TrainConfig.from_dict({**base, **kw})


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match="unknown config keys: tensor_parallel"):
        TrainConfig.from_dict({"tensor_parallel": 2})


@pytest.mark.parametrize("kw,world,flag", [
    (dict(sequence_parallel=True), 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (dict(sequence_parallel=True, tensor_model_parallel_size=2), 2, "--sequence-parallel needs --transformer-impl"),
    (dict(global_batch_size=6, micro_batch_size=4), 1, "--global-batch-size 6 is not divisible"),
    (dict(global_batch_size=4, micro_batch_size=4), 2, "data-parallel size 2"),
    (dict(tensor_model_parallel_size=2), 3, "world size 3 is not divisible"),
    (dict(bf16=True, fp16=True), 1, "--bf16 and --fp16 are exclusive"),
    (dict(fp8_format="hybrid"), 1, "--fp8-format needs --bf16"),
    (dict(min_lr=1.0, lr=0.1), 1, "--min-lr"),
    (dict(lr=float("inf")), 1, "--lr must be a finite number"),
    (dict(recompute_granularity="some"), 1, "--recompute-granularity"),
    (dict(data_path=None), 1, "pretraining needs --data-path"),
])
def test_cross_field_rules_name_the_flag(kw, world, flag):
    with pytest.raises(ValueError, match=flag.replace("+", r"\+")):
        pretrain_cfg(**kw).validate(world)


def fp8_cfg() -> TrainConfig:
    return pretrain_cfg(bf16=True, fp8_format="hybrid", fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
                        transformer_impl="transformer_engine", use_flash_attn=True).validate(1)


def test_fp8_flags_reach_transformer_config():
    from megatron.core.transformer.enums import AttnBackend

    from megatron_patch.models import get_family
    from megatron_patch.models.builder import transformer_config
    from megatron_patch.training.setup import model_config_overrides

    arch = get_family("llama").arch_from_hf(get_family("llama").flavor("tiny"))
    cfg = fp8_cfg()
    config = transformer_config(arch, params_dtype=__import__("torch").bfloat16, **model_config_overrides(cfg))
    assert config.fp8 == "hybrid"
    assert config.fp8_amax_history_len == 1024
    assert config.fp8_amax_compute_algo == "max"
    assert config.fp8_recipe == "delayed"
    assert config.bf16 and config.attention_backend == AttnBackend.flash


def test_fp8_refused_before_work_on_this_machine(capsys):
    from megatron_patch.runtime import cuda_available
    from megatron_patch.train import main
    from megatron_patch.training.setup import check_precision_support

    if cuda_available():
        pytest.skip("this test is about a machine without CUDA")
    with pytest.raises(RuntimeError, match="FP8 needs a CUDA GPU and Transformer Engine .*PR=bf16 in the launch"):
        check_precision_support(fp8_cfg())
    argv = ["pretrain", "--model-name", "llama", "--model-size", "tiny", "--tokenizer-model", "tok", "--data-path",
            "d", "--train-iters", "5", "--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
            "--fp8-amax-compute-algo", "max", "--transformer-impl", "transformer_engine"]
    assert main(argv) == 1
    err = capsys.readouterr().err  # the way out is bf16, not --transformer-impl local (which FP8 refuses too)
    assert "FP8 needs a CUDA GPU" in err and "--bf16 without --fp8-format" in err and "transformer-impl local" not in err


def test_resolved_config_written(tmp_path):
    import json

    path = pretrain_cfg(lr=0.5).write(tmp_path)
    assert TrainConfig.from_dict(json.loads(path.read_text())).lr == 0.5
