"""ALiBi (attention with linear biases) for megatron-core attention, which has none of its own.

The bias added to the pre-softmax score of query i and key j in head h is ``slope_h * j`` (HF bloom and
Baichuan-13B add exactly this; it equals ``slope_h * (j - i)`` up to a per-row constant, which softmax ignores).
Slopes follow HF ``_get_alibi_slopes``: for n heads with p = the largest power of two <= n, the geometric series
``2^(-8/p)^k`` for k = 1..p, followed (when n is not a power of two) by the odd powers k = 1, 3, 5, ... of
``2^(-8/(2p))`` for the remaining n - p heads.

Tensor parallelism: a rank holds heads ``[r * n/TP, (r + 1) * n/TP)`` (megatron-core splits ``linear_qkv``
per query group, in order), so each rank uses that slice of the slopes.

Core-attention classes with ALiBi enter through the layer spec (``self_attention.submodules.core_attention``):
  * ``SDPAAlibiDotProductAttention`` (``layers/sdpa.py``, the local spec's default): the bias is the float mask of
    ``F.scaled_dot_product_attention``.
  * ``AlibiDotProductAttention`` (local spec with ``fused_local=False``, the reference): megatron-core's unfused
    ``DotProductAttention`` whose softmax module receives the bias added to its scores.
  * ``TEAlibiDotProductAttention`` (Transformer-Engine spec): TE's fused attention takes ALiBi natively
    (``core_attention_bias_type="alibi"``, ``alibi_slopes``). Written against TE's documented API; it cannot
    be run on these CPU-only machines, so it is not covered by a test here.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from ..errors import ConfigError, MachineSupportError, UnsupportedModelError


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slope of every head, shape (num_heads,), float32, computed as HF transformers does."""
    if num_heads < 1:
        raise UnsupportedModelError(f"ALiBi needs at least one attention head (got {num_heads})")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def local_alibi_slopes(num_heads: int, tp: int, tp_rank: int) -> torch.Tensor:
    """The slopes of the heads TP rank ``tp_rank`` holds (its contiguous block of ``num_heads / tp`` heads)."""
    if num_heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the {num_heads} attention heads")
    per_rank = num_heads // tp
    return alibi_slopes(num_heads)[tp_rank * per_rank:(tp_rank + 1) * per_rank]


def alibi_bias(slopes: torch.Tensor, key_length: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive bias (1, heads, 1, key_length): ``slope_h * j`` for key position j (broadcast over queries)."""
    positions = torch.arange(key_length, dtype=torch.float32, device=device)
    return (slopes.to(device=device).view(1, -1, 1, 1) * positions.view(1, 1, 1, -1)).to(dtype)


def this_rank_slopes(config, tp_group) -> torch.Tensor:
    """The slopes of the heads this TP rank holds, for a core attention built with ``config``."""
    if config.context_parallel_size > 1:
        # ALiBi needs each key's absolute position; context parallelism reorders the sequence across ranks.
        raise ConfigError("ALiBi attention does not support context parallelism; use --context-parallel-size 1")
    tp = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    return local_alibi_slopes(config.num_attention_heads, tp, rank)


def check_alibi_config(config) -> None:
    """Refuse the TransformerConfig options the local ALiBi attention cannot honour (one line each)."""
    if config.softmax_type != "vanilla":
        raise ConfigError(f"ALiBi attention supports --softmax-type vanilla only (got {config.softmax_type})")
    if config.apply_query_key_layer_scaling:
        # The unfused softmax would multiply the bias by the layer number along with the scores.
        raise ConfigError("ALiBi attention does not support --apply-query-key-layer-scaling")


class _AlibiSoftmax(torch.nn.Module):
    """Adds the ALiBi bias to the (already 1/sqrt(d)-scaled) scores, then runs megatron-core's masked softmax."""

    def __init__(self, softmax: torch.nn.Module, slopes: torch.Tensor):
        super().__init__()
        self.softmax = softmax
        # A plain fp32 attribute, not a buffer: no checkpoint entry (the slopes follow from the head count), and
        # Float16Module's .half()/.bfloat16() cannot round them (HF builds the bias in fp32, then casts it).
        self.slopes = slopes.float()

    def forward(self, scores: torch.Tensor, mask, *args, **kwargs):
        # scores: (batch, local heads, query length, key length), already multiplied by 1/sqrt(head_dim)
        if self.slopes.device != scores.device:
            self.slopes = self.slopes.to(scores.device)  # once: .cuda() does not move plain attributes
        bias = alibi_bias(self.slopes, scores.shape[-1], scores.dtype, scores.device)
        return self.softmax(scores + bias, mask, *args, **kwargs)


@functools.cache
def _local_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class AlibiDotProductAttention(DotProductAttention):
        """megatron-core ``DotProductAttention`` with ALiBi: the bias enters just before the masked softmax."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            check_alibi_config(config)
            slopes = this_rank_slopes(config, self.tp_group)
            self.scale_mask_softmax = _AlibiSoftmax(self.scale_mask_softmax, slopes)

    return AlibiDotProductAttention


@functools.cache
def _te_class():
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention, te

    if not HAVE_TE:
        raise MachineSupportError("ALiBi with --transformer-impl transformer_engine needs Transformer Engine, which is not "
                           "installed; use --transformer-impl local")
    te_forward = te.pytorch.DotProductAttention.forward
    if "alibi_slopes" not in inspect.signature(te_forward).parameters:
        raise MachineSupportError("this Transformer Engine build has no ALiBi support (DotProductAttention.forward takes "
                           "no alibi_slopes); upgrade transformer-engine or use --transformer-impl local")

    class TEAlibiDotProductAttention(TEDotProductAttention):
        """TE fused attention with ALiBi, which TE applies as ``-slope * (i + sk - sq - j)`` (equal to ours up to
        a per-row constant).

        UNVERIFIED: written against TE's documented ``DotProductAttention.forward`` arguments; no GPU or TE is
        available where this project is developed, so no test has run it. Packed sequences are refused rather
        than guessed at.
        """

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            from megatron.core import parallel_state

            slopes = this_rank_slopes(config, parallel_state.get_tensor_model_parallel_group())
            self.alibi_slopes_fp32 = slopes.float()  # TE wants fp32 slopes; a plain attribute keeps them fp32

        def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if packed_seq_params is not None or attention_bias is not None:
                raise ConfigError("ALiBi attention with Transformer Engine supports neither packed sequences nor an "
                                 "extra attention bias")
            # Bypass TEDotProductAttention.forward (it only forwards a post-scale bias) and call TE directly.
            return te_forward(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type.name,
                              core_attention_bias_type="alibi",
                              alibi_slopes=self.alibi_slopes_fp32.to(query.device))

    return TEAlibiDotProductAttention


def alibi_core_attention(transformer_impl: str) -> type:
    """The core-attention class with ALiBi for a layer spec of ``transformer_impl`` ("local" | "transformer_engine")."""
    return _te_class() if transformer_impl == "transformer_engine" else _local_class()
