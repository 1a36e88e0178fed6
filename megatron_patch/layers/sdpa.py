"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core's local layer spec.

megatron-core's local ``DotProductAttention`` materialises the (batch, heads, s, s) score matrix, a causal mask and
the probabilities, in several unfused kernels. On one H200 that made the toolkit's train step 0.48x a plain
transformers loop at the llama-7B layer shape; SDPA alone brought it to 0.81x (see shared/notes/gpu-facts.md).
``SDPADotProductAttention`` is a drop-in subclass entering through the layer spec
(``self_attention.submodules.core_attention``): same constructor, same ``forward`` interface, same (empty)
checkpoint state, and the same result as the parent up to float rounding:

  * causal self-attention uses ``is_causal=True`` (no s x s mask; flash kernels on GPU, the fused CPU kernel on CPU);
  * grouped-query attention uses ``enable_gqa`` where no mask is passed, else K/V are expanded per head;
  * an explicit boolean mask (True = masked out, megatron-core's convention; e.g. packed SFT sequences) is applied
    exactly; a row masked out entirely gets the mean of the values, as the parent's ``masked_fill(-10000)`` gives;
  * ALiBi (``SDPAAlibiDotProductAttention``) enters as an additive float bias, as in ``layers/alibi.py``;
  * attention dropout is applied in training under megatron-core's model-parallel RNG stream, as the parent does;
  * the static KV-cache inference path is unchanged (megatron-core's ``Attention`` hands in the cached keys and
    values and switches the mask type to ``no_mask`` after the prompt).

Not supported (refused at construction with one line): sliding-window attention, non-vanilla softmax types.
Packed sequences (``packed_seq_params``) and an extra ``attention_bias`` are refused as the parent refuses them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from ..errors import ConfigError
from .alibi import alibi_bias, check_alibi_config, this_rank_slopes

# enable_gqa (torch >= 2.5) lets the flash / CPU kernels read each K/V head for its whole query group.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


# The causal ALiBi bias of the last shape used (one entry: the layers of a model share it; a new shape replaces it).
_CAUSAL_ALIBI: dict = {}


def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, heads, d] -> [b, heads, s, d] (a view; SDPA kernels take any strides with a unit last dimension)."""
    return x.permute(1, 2, 0, 3)


def _expand_groups(x: torch.Tensor, per_group: int) -> torch.Tensor:
    """[b, groups, s, d] -> [b, groups * per_group, s, d], head h reading group h // per_group (megatron's order)."""
    if per_group == 1:
        return x
    b, groups, s, d = x.shape
    return x.unsqueeze(2).expand(b, groups, per_group, s, d).reshape(b, groups * per_group, s, d)


class SDPADotProductAttention(DotProductAttention):
    """megatron-core ``DotProductAttention`` computed by ``F.scaled_dot_product_attention``.

    Shapes: query [sq, b, heads, d], key/value [sk, b, groups, d] (this TP rank's heads and groups);
    ``attention_mask`` None or bool broadcastable to [b, heads, sq, sk] (True = masked out); output [sq, b, heads * d].
    """

    uses_alibi = False

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if config.softmax_type != "vanilla":
            raise ConfigError(f"SDPA core attention supports --softmax-type vanilla only (got {config.softmax_type})")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ConfigError("SDPA core attention does not support sliding-window attention (--window-size)")
        # The parent divides its matmul scale by the layer number and the softmax multiplies it back
        # (apply_query_key_layer_scaling, an fp16 overflow guard); SDPA kernels scale in fp32, so use the product.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)
        self.dropout_p = self.attention_dropout.p
        self.query_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        del self.scale_mask_softmax  # unused: SDPA scales, masks and normalises in one kernel
        self.alibi_slopes = None
        if self.uses_alibi:
            check_alibi_config(config)
            # A plain fp32 attribute, not a buffer: no checkpoint entry, and Float16Module cannot round it.
            self.alibi_slopes = this_rank_slopes(config, self.tp_group).float()
            self.alibi_key = tuple(self.alibi_slopes.tolist())  # host copy: names the cached causal bias

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ConfigError("packed sequences need --transformer-impl transformer_engine (TE fused attention)")
        if attention_bias is not None:
            raise ConfigError("an extra attention bias is not supported by the local spec's core attention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.size(0), key.size(0)
        if value.requires_grad and torch.is_grad_enabled():
            # value is a view into linear_qkv's fused output: saved for backward as is, it would keep the whole
            # [s, b, (heads + 2 * groups) * d] tensor alive; a copy keeps only V (as separate q/k/v linears do).
            value = value.contiguous()
        q, k, v = _to_bhsd(query), _to_bhsd(key), _to_bhsd(value)
        # As the parent: a given mask is applied whatever the mask type; else causal only when several queries
        # are present (after the prompt the KV-cache path passes no_mask, or a single query that sees every key).
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:
            raise ValueError(f"causal attention needs as many queries as keys (got {sq} and {sk})")
        bias = self._alibi(sq, sk, causal, q) if self.uses_alibi else None
        fully_masked = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(q.device)
            # The parent fills masked scores with -10000: a row masked everywhere becomes uniform over the keys.
            fully_masked = attention_mask.all(dim=-1, keepdim=True)
            keep = ~attention_mask | fully_masked  # such rows attend to everything here; replaced below
            bias = keep if bias is None else bias.masked_fill(~keep, float("-inf"))
        elif bias is not None:
            causal = False  # the causal part is inside the ALiBi bias (SDPA takes a mask or is_causal, not both)
        gqa = {}
        if self.query_per_group > 1:
            if bias is None and _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:  # the memory-efficient kernel (masks, biases) takes no grouped K/V
                k, v = _expand_groups(k, self.query_per_group), _expand_groups(v, self.query_per_group)
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal,
                                                 scale=self.sdpa_scale, **gqa)
        if fully_masked is not None:  # with a mask K/V were expanded above: v is [b, heads, sk, d]
            out = torch.where(fully_masked, v.mean(dim=2, keepdim=True), out)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, out.size(0), self.hidden_size_per_partition)

    def _alibi(self, sq: int, sk: int, causal: bool, q: torch.Tensor) -> torch.Tensor:
        """ALiBi bias in the query dtype: (1, heads, 1, sk), or (1, heads, sq, sk) with -inf above the diagonal."""
        if self.alibi_slopes.device != q.device:
            self.alibi_slopes = self.alibi_slopes.to(q.device)  # once: .cuda() does not move plain attributes
        if not causal:
            return alibi_bias(self.alibi_slopes, sk, q.dtype, q.device)
        key = (self.alibi_key, sq, sk, q.dtype, q.device)
        if _CAUSAL_ALIBI.get("key") != key:
            # SDPA keeps its mask for backward: one shared (heads, s, s) tensor for every layer, not one per layer.
            bias = alibi_bias(self.alibi_slopes, sk, q.dtype, q.device)
            future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
            _CAUSAL_ALIBI.update(key=key, bias=bias.expand(1, -1, sq, sk).masked_fill(future, float("-inf")))
        return _CAUSAL_ALIBI["bias"]

    def _dropout_rng(self, dropout_p: float):
        # Dropout inside a TP region must differ across TP ranks: megatron-core's model-parallel stream, as the
        # parent uses (under sequence parallelism the parent uses the default stream).
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()


class SDPAAlibiDotProductAttention(SDPADotProductAttention):
    """``SDPADotProductAttention`` with ALiBi (``layers/alibi.py``): the bias is added to the scaled scores."""

    uses_alibi = True


def sdpa_core_attention(alibi: bool = False) -> type:
    """The SDPA core-attention class for the local layer spec, with or without ALiBi."""
    return SDPAAlibiDotProductAttention if alibi else SDPADotProductAttention
