"""What Megatron-LM records beside a model's tensors, so that Megatron-LM's ``--load`` and Megatron-Bridge's loader
open this toolkit's checkpoints: its ``args`` namespace, ``checkpoint_version`` and ``iteration``.

Megatron-LM keeps them in ``common.pt`` of a torch_dist checkpoint (the non-tensor part of its state dict) and in
every legacy ``model_optim_rng.pt``. Megatron-LM's ``load_checkpoint`` reads ``iteration`` and
``checkpoint_version`` and compares the model's shape in ``args`` with its own flags (``check_checkpoint_args``);
Megatron-Bridge's ``load_megatron_model`` builds the model from ``args`` when a checkpoint has no
``run_config.yaml``: it copies every ``args`` attribute named like a ``TransformerConfig`` field and reads a few
Megatron-LM-only names directly. The names below are Megatron-LM's flags (``--num-layers`` -> ``num_layers``).

One function, used by every writer: ``megatron_lm_common`` (hf2mcore legacy rank files through the format's
``write``; torch_dist common.pt of hf2mcore and of training saves through ``write_checkpoint_meta``).
Readers of this toolkit drop the keys again before loading tensors (``MEGATRON_LM_COMMON_KEYS``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .trusted_load import check_torch_dist_checkpoint, megatron_lm_args_globals

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current layout (fused QKV per query group, as megatron-core's)
MEGATRON_LM_COMMON_KEYS = ("args", "checkpoint_version", "iteration")
COMMON_FILE = "common.pt"  # torch_dist: the non-tensor part of the state dict


def megatron_lm_args(spec, *, tp: int, pp: int, dtype: torch.dtype, transformer_impl: str, iteration: int,
                     run: dict | None = None, tokenizer_dir: str | None = None,
                     ckpt_format: str = "torch_dist") -> argparse.Namespace:
    """Megatron-LM's ``args`` for a model ``spec`` (models.spec.ModelSpec) saved at TP x PP in ``dtype``.

    ``run``: a training run's own settings (TrainConfig fields: batch sizes, LR, consumed samples ...), recorded
    under the same names Megatron-LM gives them; absent for a conversion. ``tokenizer_dir``: where the checkpoint's
    ``hf_assets/`` will be once the checkpoint is in place (Megatron-LM records an absolute tokenizer path too).
    """
    arch = spec.arch
    rope = arch.position_embedding == "rope"
    values = dict(
        # the model's shape (check_checkpoint_args compares these; Bridge builds its TransformerConfig from them)
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, kv_channels=arch.head_dim,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, max_position_embeddings=arch.max_position_embeddings,
        # add_position_embedding: Megatron-LM's default, which check_checkpoint_args compares with the run's flags
        # (only learned_absolute embeddings read it; Megatron-LM's own llama converter leaves it at True)
        position_embedding_type="rope" if rope else "none", add_position_embedding=True,
        use_rotary_position_embeddings=rope, rotary_base=int(arch.rope_theta) if rope else 10000,
        rotary_percent=1.0, rotary_interleaved=False, apply_rope_fusion=False,
        use_rope_scaling=bool(arch.rope_scaling), rope_scaling_factor=float((arch.rope_scaling or {}).get("factor", 8.0)),
        normalization=arch.normalization, norm_epsilon=arch.norm_epsilon, layernorm_epsilon=arch.norm_epsilon,
        apply_layernorm_1p=False, layernorm_zero_centered_gamma=False, qk_layernorm=arch.qk_layernorm,
        swiglu=arch.gated_linear_unit, gated_linear_unit=arch.gated_linear_unit, squared_relu=False,
        add_bias_linear=arch.add_linear_bias, add_qkv_bias=arch.add_qkv_bias,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings, init_method_std=arch.init_std,
        init_method_xavier_uniform=False, multi_latent_attention=False, num_experts=None, moe_router_topk=2,
        is_hybrid_model=False, heterogeneous_layers_config_path=None, hidden_dropout=0.0, attention_dropout=0.0,
        # vocabulary and tokenizer (the tokenizer files are the checkpoint's hf_assets/)
        padded_vocab_size=spec.padded_vocab_size, make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
        vocab_size=spec.vocab_size, tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir,
        vocab_file=None, merge_file=None, vocab_extra_ids=0,
        # parallelism, precision, format
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1, expert_model_parallel_size=1, sequence_parallel=False,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        params_dtype=dtype, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, fp8=None, fp8_param_gather=False,
        transformer_impl=transformer_impl, ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "legacy",
        no_persist_layer_norm=True, overlap_p2p_comm=False, bias_swiglu_fusion=False, bias_gelu_fusion=False,
        cp_comm_type=["p2p"], config_logger_dir="", seq_length=arch.max_position_embeddings,
        # a run's progress (Megatron-LM resumes its sample counters from these); the optimizer and RNG states of a
        # training save live in train_state/, not where Megatron-LM looks: it skips them, as for a run saved so
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0, skipped_train_samples=0,
        no_save_optim=True, no_save_rng=True,
    )
    for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "lr", "min_lr",
                 "lr_decay_style", "lr_warmup_iters", "lr_decay_iters", "weight_decay", "clip_grad", "seed",
                 "adam_beta1", "adam_beta2", "adam_eps", "consumed_train_samples", "sequence_parallel"):
        if run and run.get(name) is not None:
            values[name] = run[name]
    return argparse.Namespace(**values)


def megatron_lm_common(spec, *, tp: int, pp: int, dtype: torch.dtype, transformer_impl: str,
                       iteration: int | str, run: dict | None = None, tokenizer_dir: str | None = None,
                       ckpt_format: str = "torch_dist") -> dict:
    """``{"args", "checkpoint_version", "iteration"}`` as Megatron-LM saves them (``release`` counts as 0)."""
    step = 0 if iteration == "release" else int(iteration)
    return {"args": megatron_lm_args(spec, tp=tp, pp=pp, dtype=dtype, transformer_impl=transformer_impl,
                                     iteration=step, run=run, tokenizer_dir=tokenizer_dir, ckpt_format=ckpt_format),
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": step}


def without_megatron_lm_common(state: dict) -> dict:
    """A loaded state dict without the keys above (megatron-core's ``dist_checkpointing.load`` merges common.pt
    into what it returns)."""
    return {key: value for key, value in state.items() if key not in MEGATRON_LM_COMMON_KEYS}


def load_model_state(sharded_state_dict: dict, iter_dir: str | os.PathLike) -> dict:
    """``dist_checkpointing.load`` of a model's tensors, without the Megatron-LM keys of common.pt.

    megatron-core loads common.pt with ``torch.load``'s default ``weights_only=True``, which refuses the ``args``
    namespace unless its types are allowed (Megatron-LM allows the same ones); the other pickles it reads it trusts
    blindly, so the files are vetted first.
    """
    from megatron.core import dist_checkpointing  # lazy: the converters write common.pt without megatron-core

    check_torch_dist_checkpoint(iter_dir)
    with torch.serialization.safe_globals(megatron_lm_args_globals()):
        state = dist_checkpointing.load(sharded_state_dict, str(iter_dir))
    return without_megatron_lm_common(state)


def write_megatron_lm_common(iter_dir: str | os.PathLike, spec, *, tp: int, pp: int, dtype: torch.dtype,
                             transformer_impl: str, iteration: int | str, run: dict | None = None,
                             tokenizer_dir: str | None = None) -> None:
    """Add ``megatron_lm_common`` to a torch_dist checkpoint's ``common.pt`` (kept: what megatron-core put there)."""
    path = Path(iter_dir) / COMMON_FILE
    common = torch.load(path, weights_only=True) if path.is_file() else {}
    common.update(megatron_lm_common(spec, tp=tp, pp=pp, dtype=dtype, transformer_impl=transformer_impl,
                                     iteration=iteration, run=run, tokenizer_dir=tokenizer_dir))
    tmp = path.with_name(f".{COMMON_FILE}.tmp")
    torch.save(common, tmp)
    os.replace(tmp, path)
