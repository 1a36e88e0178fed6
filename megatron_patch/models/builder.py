"""ModelArch -> megatron-core TransformerConfig, layer spec and GPTModel. Written once for every family."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MachineSupportError
from ..layers.rope import rope_inv_freq, set_rope_inv_freq
from ..runtime.cpu import cuda_available
from .arch import ModelArch

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def have_transformer_engine() -> bool:
    from megatron.core.extensions import transformer_engine

    return bool(transformer_engine.HAVE_TE)


def check_transformer_impl(transformer_impl: str) -> None:
    """Refuse a Transformer Engine build on a machine that cannot run one, saying what is missing."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)} (got {transformer_impl})")
    if transformer_impl == "transformer_engine":
        missing = []
        if not cuda_available():
            missing.append("a CUDA GPU")
        if not have_transformer_engine():
            missing.append("Transformer Engine (pip install 'megatron-patch[gpu]')")
        if missing:
            raise MachineSupportError(
                f"--transformer-impl transformer_engine needs {' and '.join(missing)}; "
                "use --transformer-impl local on this machine"
            )


def transformer_config(
    arch: ModelArch,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
):
    """The megatron-core TransformerConfig for ``arch``; ``overrides`` are TransformerConfig fields (training flags)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=arch.gated_linear_unit,
        activation_func=F.silu if arch.gated_linear_unit else _gelu,
        add_bias_linear=arch.add_linear_bias,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Initialise the full weight on the CPU, then split: the same init at every TP size (and no GPU needed).
        use_cpu_initialization=True,
    )
    if arch.is_moe:
        fields.update(moe_fields(arch))
    fields.update(overrides)
    return TransformerConfig(**fields)


def moe_fields(arch: ModelArch) -> dict:
    """The TransformerConfig fields that make ``arch``'s MoE layers: megatron-core's router, its SequentialMLP
    experts (one MLP per expert, the layout the converter writes) and its shared expert; routing as ``moe.py``
    describes. Training flags (dispatcher, aux loss, EP size) override these."""
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size or None,
        moe_shared_expert_gate=arch.moe_shared_expert_gate,
        # An int 1 (every layer) keeps megatron-core's checkpoint keys stacked over layers; a list makes them
        # per layer (``checkpoint/torch_dist.py`` writes either).
        moe_layer_freq=list(arch.moe_layers) if arch.moe_layers is not None else 1,
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.0,
    )


def _gelu(x):
    # HF bloom/gpt2-style MLPs use the tanh approximation.
    return F.gelu(x, approximate="tanh")


def layer_spec(arch: ModelArch, transformer_impl: str = "local", *, fused_local: bool = True, moe: bool = False):
    """The GPTModel layer spec of ``arch``: megatron-core's local or Transformer-Engine spec plus this toolkit's
    core attention where needed (ALiBi; on the local spec SDPA attention, ``layers/sdpa.py``) and, on the local
    spec, the SwiGLU MLP (``layers/swiglu.py``). ``moe``: the spec of a MoE layer (megatron-core's MoELayer with
    SequentialMLP experts) instead of a dense one.

    ``fused_local=False`` keeps megatron-core's own unfused local modules (``DotProductAttention``, ``MLP``): the
    reference the fast path is tested against. The TE spec is unaffected (its attention and MLP are TE's own).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    check_transformer_impl(transformer_impl)
    if moe and transformer_impl == "transformer_engine":
        # megatron-core's TE spec keeps a MoE layer's pre-MLP norm as its own module, under another checkpoint key
        # than the local spec's: the converter writes the local spec's layout only.
        raise ConfigError("mixture-of-experts models build with --transformer-impl local only")
    experts = dict(num_experts=arch.num_experts, moe_grouped_gemm=False) if moe else {}
    alibi = arch.position_embedding == "alibi"
    if transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
        core_attention = None
        if alibi:
            from ..layers.alibi import alibi_core_attention

            core_attention = alibi_core_attention(transformer_impl)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization=arch.normalization, **experts)
        if not fused_local:
            from ..layers.alibi import alibi_core_attention

            core_attention = alibi_core_attention(transformer_impl) if alibi else None
        else:
            from ..layers.sdpa import sdpa_core_attention

            # Fused attention without Transformer Engine: megatron-core's local attention is unfused (s x s scores).
            core_attention = sdpa_core_attention(alibi=alibi)
    spec = copy.deepcopy(spec)  # specs are plain dataclasses: never alter one megatron-core may hand out again
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    if transformer_impl == "local" and fused_local and arch.gated_linear_unit and not moe:
        from ..layers.swiglu import SwiGLUMLP

        # The unfused gated MLP keeps 4 ffn-wide activations per layer and copies `up` each step; SwiGLUMLP keeps 2.
        spec.submodules.mlp = SwiGLUMLP  # the class itself: see SwiGLUMLP's docstring
    return spec


def decoder_spec(arch: ModelArch, config, transformer_impl: str = "local", *, fused_local: bool = True):
    """What GPTModel builds its decoder from: one layer spec for a dense model or one whose every layer is a MoE
    layer; for a model mixing MoE and dense layers, the spec of each layer of this pipeline stage."""
    if not arch.is_moe or arch.moe_layers is None:
        return layer_spec(arch, transformer_impl, fused_local=fused_local, moe=arch.is_moe)
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    specs = {moe: layer_spec(arch, transformer_impl, fused_local=fused_local, moe=moe) for moe in (False, True)}
    first = get_transformer_layer_offset(config)
    layers = range(first, first + get_num_layers_to_build(config))
    return TransformerBlockSubmodules(layer_specs=[specs[arch.is_moe_layer(g)] for g in layers],
                                      layer_norm=LayerNormImpl)


def add_model_patches(model, arch: ModelArch, config) -> None:
    """The additions to GPTModel's own modules that ``arch`` asks for (each in ``layers/``), on the stages that
    hold those modules: the embedding norm on the first stage, NormHead on the last."""
    if arch.embedding_norm and model.pre_process:
        from ..layers.embedding_norm import add_embedding_norm

        add_embedding_norm(model.embedding, config)
    if arch.norm_head and model.post_process:
        from ..layers.norm_head import use_norm_head

        use_norm_head(model.output_layer, config)


def build_model(
    arch: ModelArch,
    padded_vocab_size: int,
    *,
    config=None,
    transformer_impl: str = "local",
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    fused_local: bool = True,
    vocab_size: int | None = None,
    lora=None,
    lora_seed: int = 0,
):
    """One pipeline stage of ``arch`` as a megatron-core GPTModel on the current TP/PP ranks
    (``fused_local``: see ``layer_spec``). ``vocab_size``: the real token rows; when given and smaller than
    ``padded_vocab_size`` the language-model loss leaves the padding rows out (``layers/vocab_padding.py``).
    ``lora``: a LoRAConfig; the stage is frozen and gets adapters (``layers/lora.py``), seeded by ``lora_seed``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from ..layers.lora import add_lora  # these import megatron-core, which this module imports only when building
    from ..layers.vocab_padding import mask_vocab_padding_in_loss

    if config is None:
        config = transformer_config(
            arch,
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            **({"expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
                "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size()}
               if arch.is_moe else {}),
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(arch, config, transformer_impl, fused_local=fused_local),
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope" if arch.position_embedding == "rope" else "none",
        rotary_base=arch.rope_theta,
    )
    add_model_patches(model, arch, config)
    if post_process and vocab_size is not None and vocab_size < padded_vocab_size:
        mask_vocab_padding_in_loss(model, vocab_size)
    if arch.position_embedding == "rope":
        set_rope_inv_freq(model, rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling))
    _parameters_in_params_dtype(model, config.params_dtype)
    if lora is not None:
        add_lora(model, lora, lora_seed)
    return model


def _parameters_in_params_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter in ``dtype``, buffers (RoPE frequencies, ALiBi slopes) left as they are.

    Without Apex or Transformer Engine megatron-core's local spec falls back to ``torch.nn`` norms built in the
    default dtype, so a bf16 model held fp32 norm weights: megatron-core's Float16Optimizer then keeps them outside
    its fp16 groups and cannot describe them in a checkpoint ("Param id N does not match any model sharded param"),
    i.e. every bf16/fp16 save failed. TE's and Apex's norms use ``params_dtype``, as HF's bf16 checkpoints do.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype.is_floating_point and param.dtype != dtype:
                param.data = param.data.to(dtype)
