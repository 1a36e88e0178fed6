"""The sharding engine per row kind x TP rank, on tiny tensors (Megatron-Bridge's param-mapping test pattern).

Every HF tensor holds distinct values, and each expected shard is written out from the HF tensors by hand (which
heads, which rows, in which order), so a layout bug fails here in milliseconds with the row kind and rank named.
Then the shards of all ranks merge back to the full megatron tensor, and that exports back to the HF tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_patch.mapping import (
    QKV,
    SPLITS,
    Direct,
    Entry,
    FusedQKV,
    GatedMLP,
    PerHeadQKV,
    Sharding,
    Split,
    merge_for_tp,
    split_for_tp,
)

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB, EXTRA, PADDED = 8, 4, 2, 8, 8, 10, 1, 16


@dataclasses.dataclass(frozen=True)
class TinyArch:
    num_layers: int = 1
    hidden_size: int = HIDDEN
    ffn_hidden_size: int = FFN
    num_attention_heads: int = HEADS
    num_query_groups: int = GROUPS
    head_dim: int = HEAD_DIM
    vocab_size: int = VOCAB
    gated_linear_unit: bool = True
    tie_word_embeddings: bool = False

    def check_parallel(self, tp: int, pp: int) -> None:
        if self.num_query_groups % tp or self.num_layers % pp:
            raise ValueError(f"cannot split over TP={tp} PP={pp}")


def _values(*shape: int, offset: int = 0) -> torch.Tensor:
    """Distinct values, so that any misplaced element shows."""
    n = 1
    for size in shape:
        n *= size
    return (torch.arange(n, dtype=torch.float32) + offset).reshape(shape)


def _sharding(rows, tp: int, arch=None) -> Sharding:
    return Sharding(rows=rows, arch=arch or TinyArch(), tp=tp, pp=1, padded_vocab_size=PADDED, extra_vocab_size=EXTRA)


def _rank_range(size: int, tp: int, rank: int) -> slice:
    per = size // tp
    return slice(rank * per, (rank + 1) * per)


def _qkv_rows(q, k, v, groups: range, heads_per_group: int) -> torch.Tensor:
    """megatron-core's linear_qkv rows for ``groups``: per group [its query heads, its k head, its v head]."""
    parts = []
    for g in groups:
        parts += [q[g * heads_per_group * HEAD_DIM:(g + 1) * heads_per_group * HEAD_DIM],
                  k[g * HEAD_DIM:(g + 1) * HEAD_DIM], v[g * HEAD_DIM:(g + 1) * HEAD_DIM]]
    return torch.cat(parts)


def _case(kind: str):
    """(row, HF tensors, arch, expected shard of (tp, rank))."""
    arch = TinyArch()
    if kind == "column":
        w = _values(FFN, HIDDEN)
        return Direct("m.*.w", "h.*.w", Split.COLUMN), [w], arch, lambda tp, r: w[_rank_range(FFN, tp, r)]
    if kind == "row":
        w = _values(HIDDEN, FFN)
        return Direct("m.*.w", "h.*.w", Split.ROW), [w], arch, lambda tp, r: w[:, _rank_range(FFN, tp, r)]
    if kind == "replicated":
        w = _values(HIDDEN)
        return Direct("m.*.w", "h.*.w"), [w], arch, lambda tp, r: w
    if kind == "vocab":
        w = _values(VOCAB, HIDDEN)
        # Real rows, then EXTRA new rows (the mean of the real ones), then zero padding up to PADDED.
        padded = torch.cat([w, w.mean(dim=0, keepdim=True), torch.zeros(PADDED - VOCAB - EXTRA, HIDDEN)])
        return (Direct("embedding.word_embeddings.weight", "e.w", Split.VOCAB), [w], arch,
                lambda tp, r: padded[_rank_range(PADDED, tp, r)])
    if kind in ("qkv", "qkv_bias", "fused_qkv"):
        tail = () if kind == "qkv_bias" else (HIDDEN,)
        q = _values(HEADS * HEAD_DIM, *tail)
        k = _values(GROUPS * HEAD_DIM, *tail, offset=1000)
        v = _values(GROUPS * HEAD_DIM, *tail, offset=2000)

        def expected(tp, r):
            return _qkv_rows(q, k, v, range(GROUPS)[_rank_range(GROUPS, tp, r)], HEADS // GROUPS)

        if kind == "fused_qkv":
            return FusedQKV("m.*.qkv", "h.*.wpack"), [torch.cat([q, k, v])], arch, expected
        return QKV("m.*.qkv", "h.*.q", "h.*.k", "h.*.v"), [q, k, v], arch, expected
    if kind == "per_head_qkv":
        mha = TinyArch(num_query_groups=HEADS)
        q = _values(HEADS * HEAD_DIM, HIDDEN)
        k = _values(HEADS * HEAD_DIM, HIDDEN, offset=1000)
        v = _values(HEADS * HEAD_DIM, HIDDEN, offset=2000)
        per_head = torch.cat([torch.cat([q[h * HEAD_DIM:(h + 1) * HEAD_DIM], k[h * HEAD_DIM:(h + 1) * HEAD_DIM],
                                         v[h * HEAD_DIM:(h + 1) * HEAD_DIM]]) for h in range(HEADS)])
        return (PerHeadQKV("m.*.qkv", "h.*.qkv"), [per_head], mha,
                lambda tp, r: _qkv_rows(q, k, v, range(HEADS)[_rank_range(HEADS, tp, r)], 1))
    if kind == "gated":
        gate, up = _values(FFN, HIDDEN), _values(FFN, HIDDEN, offset=1000)
        # Rank r: its slice of the gate, then its slice of the up projection (never a slice of [gate; up]).
        return (GatedMLP("m.*.fc1", "h.*.gate", "h.*.up"), [gate, up], arch,
                lambda tp, r: torch.cat([gate[_rank_range(FFN, tp, r)], up[_rank_range(FFN, tp, r)]]))
    raise AssertionError(kind)


KINDS = ["column", "row", "replicated", "vocab", "qkv", "qkv_bias", "fused_qkv", "per_head_qkv", "gated"]
RANKS = [(tp, rank) for tp in (1, 2, 4) for rank in range(tp)]


@pytest.mark.parametrize("tp,rank", RANKS)
@pytest.mark.parametrize("kind", KINDS)
def test_rank_shard_is_the_expected_slice(kind, tp, rank):
    row, hf, arch, expected = _case(kind)
    sharding = _sharding([row], tp, arch)
    entry = Entry(row, 0 if row.is_layer_row else None, row.megatron)
    shard = sharding.rank_shard(entry, hf, rank)
    assert torch.equal(shard, expected(tp, rank)), (kind, tp, rank)
    assert shard.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in hf}  # an owned copy


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_shards_merge_to_the_full_tensor_and_export_to_hf(kind, tp):
    row, hf, arch, _ = _case(kind)
    sharding = _sharding([row], tp, arch)
    entry = Entry(row, 0 if row.is_layer_row else None, row.megatron)
    full = sharding.full_megatron_tensor(entry, hf)
    assert torch.equal(merge_for_tp([sharding.rank_shard(entry, hf, r) for r in range(tp)], row.split), full)
    for r, shard in enumerate(split_for_tp(full, row.split, tp)):
        assert torch.equal(shard, sharding.rank_shard(entry, hf, r)), (kind, tp, r)
    exported = dict(sharding.megatron_to_hf(lambda e: full))
    names = entry.hf_names
    if row.split is Split.VOCAB:  # the new tokens' rows are kept on export; the padding is not
        hf = [torch.cat([hf[0], hf[0].mean(dim=0, keepdim=True)])]
    assert list(exported) == names
    assert all(torch.equal(exported[n], t) for n, t in zip(names, hf)), kind


def test_every_split_has_a_split_and_a_merge():
    assert set(SPLITS) == set(Split)
    tensor = _values(8, 8)
    for split in Split:
        shards = split_for_tp(tensor, split, 2)
        assert len(shards) == 2 and torch.equal(merge_for_tp(shards, split), tensor), split


def test_tp_that_does_not_split_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocabulary rows cannot be split over TP=4"):
        Sharding(rows=(), arch=TinyArch(), tp=4, pp=1, padded_vocab_size=18)
