"""Pure tensor-layout functions between HuggingFace and megatron-core, each with its exact inverse.

Nothing here reads files or knows model families; the mapping rows (``rows.py``) and the sharding engine
(``sharding.py``) compose these. Every function returns new tensors or views; callers that persist a shard clone
it first (a saved view would drag the whole storage along).
"""

from __future__ import annotations

import functools

import torch

# --- concatenation --------------------------------------------------------------------------------------------


def concat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` (same dtype promotion, one device), written as copies into one new tensor.

    Conversions first run every layout on meta tensors (validation before IO). ``torch.cat``'s meta kernel is
    Python code whose first call imports ``torch._dynamo``: 0.7 s, plus its teardown at exit, about a tenth of
    converting a 1.6 GB checkpoint. ``copy_`` into a view has a C++ meta kernel; on real tensors this is the same
    single copy ``torch.cat`` makes.
    """
    first = tensors[0]
    dim = dim % first.dim()
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    out = first.new_empty(shape, dtype=dtype)
    start = 0
    for tensor in tensors:
        out.narrow(dim, start, tensor.shape[dim]).copy_(tensor)
        start += tensor.shape[dim]
    return out


# --- fused QKV ---------------------------------------------------------------------------------------------


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Fuse separate q, k, v projections into megatron-core's ``linear_qkv`` layout.

    Shapes (weights; biases are the same without the trailing ``hidden``):
      q: (heads * d, hidden), k and v: (groups * d, hidden).
    Result rows, for each query group g in order: [the heads/groups query heads of g (each d rows), k_g (d rows),
    v_g (d rows)]: ((heads + 2 * groups) * d, hidden). A TP rank then holds groups/TP whole groups.
    """
    groups = num_query_groups
    tail = q.shape[1:]
    head_dim = k.shape[0] // groups
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return concat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(
    qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv``: megatron-core ``linear_qkv`` rows back to (q, k, v)."""
    groups, heads = num_query_groups, num_attention_heads
    tail = qkv.shape[1:]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, *tail)
    q_rows = heads // groups * head_dim
    q, k, v = torch.split(per_group, [q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def qkv_blocks_to_megatron(fused: torch.Tensor, num_attention_heads: int, num_query_groups: int) -> torch.Tensor:
    """A fused projection stored as three blocks [q; k; v] (Baichuan ``W_pack``, Qwen v1 ``c_attn``) ->
    megatron-core's per-group ``linear_qkv`` rows.

    ``fused`` rows: q (heads * d), then k (groups * d), then v (groups * d); any trailing dims (hidden) are kept.
    """
    head_dim = fused.shape[0] // (num_attention_heads + 2 * num_query_groups)
    q, k, v = torch.split(fused, [num_attention_heads * head_dim, num_query_groups * head_dim,
                                  num_query_groups * head_dim], dim=0)
    return interleave_qkv(q, k, v, num_query_groups)


def megatron_to_qkv_blocks(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int) -> torch.Tensor:
    """Inverse of ``qkv_blocks_to_megatron``."""
    return concat(split_qkv(qkv, num_attention_heads, num_query_groups), dim=0)


def per_head_qkv_to_megatron(fused: torch.Tensor, num_attention_heads: int) -> torch.Tensor:
    """A fused projection stored per head as (q_h, k_h, v_h), each d rows (bloom ``query_key_value``) ->
    megatron-core's per-group ``linear_qkv`` rows, for multi-head attention (one query group per head).

    With groups == heads megatron-core's order is also [q_h, k_h, v_h] per head, so this is the identity on
    values; it is written as the general reordering so that the equality is checked, not assumed.
    """
    tail = fused.shape[1:]
    per_head = fused.reshape(num_attention_heads, 3, -1, *tail)
    q, k, v = (per_head[:, i].reshape(-1, *tail) for i in range(3))
    return interleave_qkv(q, k, v, num_attention_heads)


def megatron_to_per_head_qkv(qkv: torch.Tensor, num_attention_heads: int) -> torch.Tensor:
    """Inverse of ``per_head_qkv_to_megatron``."""
    tail = qkv.shape[1:]
    q, k, v = split_qkv(qkv, num_attention_heads, num_attention_heads)
    heads = num_attention_heads
    return concat([t.reshape(heads, 1, -1, *tail) for t in (q, k, v)], dim=1).reshape(-1, *tail)


# --- tensor-parallel split / merge ---------------------------------------------------------------------------


def split_tp(tensor: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    """Even split along ``dim`` (column-parallel: dim 0; row-parallel: dim 1)."""
    if tensor.shape[dim] % tp:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} is not divisible by TP={tp}")
    return list(torch.chunk(tensor, tp, dim=dim))


def merge_tp(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    return concat(shards, dim=dim)


def split_gated(tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Split a fused SwiGLU ``linear_fc1`` = [gate; up] so that rank r holds [gate_r; up_r].

    Splitting the concatenation directly would hand rank 0 all of the gate; megatron-core applies
    ``chunk(2)`` on each rank's local output, so each rank needs its own gate half followed by its own up half.
    """
    gate, up = torch.chunk(tensor, 2, dim=0)
    return [concat([g, u], dim=0) for g, u in zip(split_tp(gate, tp, 0), split_tp(up, tp, 0))]


def merge_gated(shards: list[torch.Tensor]) -> torch.Tensor:
    halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
    return concat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# --- vocabulary padding ----------------------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Megatron-LM pads the vocabulary to a multiple of divisible_by x TP so each TP rank gets equal rows."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def pad_vocab(tensor: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows`` (the rows no token id reaches)."""
    extra = padded_rows - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {tensor.shape[0]} vocabulary rows down to {padded_rows}")
    if extra == 0:
        return tensor
    return concat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))], dim=0)


def unpad_vocab(tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return tensor[:vocab_size]


def extend_vocab(tensor: torch.Tensor, extra_rows: int) -> torch.Tensor:
    """Add ``extra_rows`` new token rows, each the mean of the existing rows (a neutral start for new tokens).

    Not invertible by design: the new rows become part of the model's real vocabulary.
    """
    if extra_rows == 0:
        return tensor
    return concat([tensor, _mean_row(tensor).expand(extra_rows, *tensor.shape[1:])], dim=0)


def _mean_row(tensor: torch.Tensor) -> torch.Tensor:
    # Accumulate in fp32 without materialising an fp32 copy of the whole matrix.
    return tensor.mean(dim=0, keepdim=True, dtype=torch.float32).to(tensor.dtype)


def vocab_rows(tensor: torch.Tensor, extra_rows: int, padded_rows: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``pad_vocab(extend_vocab(tensor, extra_rows), padded_rows)``, built without the rest.

    A TP rank's slice of the vocabulary: real rows are views of ``tensor``; only the returned rows are allocated.
    """
    real, extended = tensor.shape[0], tensor.shape[0] + extra_rows
    if not 0 <= start <= stop <= padded_rows or extended > padded_rows:
        raise ValueError(f"rows [{start}, {stop}) of {padded_rows} padded rows ({extended} real) do not exist")
    parts = []
    if start < min(stop, real):
        parts.append(tensor[start:min(stop, real)])
    if max(start, real) < min(stop, extended):
        parts.append(_mean_row(tensor).expand(min(stop, extended) - max(start, real), *tensor.shape[1:]))
    if max(start, extended) < stop:
        parts.append(tensor.new_zeros((stop - max(start, extended), *tensor.shape[1:])))
    return concat(parts, dim=0) if len(parts) > 1 else parts[0].clone()


# --- pipeline placement ------------------------------------------------------------------------------------------


def pp_layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    """The global layer ids on pipeline stage ``pp_rank`` (megatron-core's even split)."""
    if num_layers % pp:
        raise ValueError(f"{num_layers} layers cannot be split evenly over PP={pp}")
    per_stage = num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def layer_location(layer: int, num_layers: int, pp: int) -> tuple[int, int]:
    """Inverse of ``pp_layer_range``: global layer id -> (pp_rank, local layer id)."""
    per_stage = num_layers // pp
    return divmod(layer, per_stage)
