"""Every layout primitive against an independent construction, and its exact inverse."""

import pytest
import torch

from megatron_patch.mapping import layouts


def _rows(n, width=3):
    # Row i holds the value i everywhere: a misplaced row is visible by value.
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, width)


@pytest.mark.parametrize("heads,groups,head_dim", [(8, 4, 2), (4, 4, 3), (6, 1, 2), (8, 8, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_order_and_inverse(heads, groups, head_dim, bias):
    q, k, v = _rows(heads * head_dim), _rows(groups * head_dim) + 1000, _rows(groups * head_dim) + 2000
    if bias:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    fused = layouts.interleave_qkv(q, k, v, groups)
    per = heads // groups
    # Written out: group g = [its `per` query heads, k_g, v_g], each head `head_dim` rows.
    expected = []
    for g in range(groups):
        expected.append(q[g * per * head_dim:(g + 1) * per * head_dim])
        expected.append(k[g * head_dim:(g + 1) * head_dim])
        expected.append(v[g * head_dim:(g + 1) * head_dim])
    assert torch.equal(fused, torch.cat(expected))
    q2, k2, v2 = layouts.split_qkv(fused, heads, groups)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_tp_shard_holds_whole_groups(tp):
    heads, groups, d = 8, 4, 2
    q, k, v = _rows(heads * d), _rows(groups * d) + 1000, _rows(groups * d) + 2000
    shards = layouts.split_tp(layouts.interleave_qkv(q, k, v, groups), tp, 0)
    for rank, shard in enumerate(shards):
        local_groups = groups // tp
        gq, gk, gv = layouts.split_qkv(shard, heads // tp, local_groups)
        first = rank * local_groups
        assert torch.equal(gk, k[first * d:(first + local_groups) * d])
        assert torch.equal(gq, q[first * (heads // groups) * d:(first + local_groups) * (heads // groups) * d])
        assert torch.equal(gv, v[first * d:(first + local_groups) * d])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_split_gives_each_rank_its_gate_then_up(tp):
    ffn = 8
    gate, up = _rows(ffn), _rows(ffn) + 100
    shards = layouts.split_gated(torch.cat([gate, up]), tp)
    width = ffn // tp
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([gate[rank * width:(rank + 1) * width], up[rank * width:(rank + 1) * width]]))
    assert torch.equal(layouts.merge_gated(shards), torch.cat([gate, up]))


@pytest.mark.parametrize("tp,dim", [(1, 0), (2, 0), (2, 1), (4, 1)])
def test_tp_split_merge_inverse(tp, dim):
    tensor = torch.randn(8, 12)
    shards = layouts.split_tp(tensor, tp, dim)
    assert all(s.shape[dim] == tensor.shape[dim] // tp for s in shards)
    assert torch.equal(layouts.merge_tp(shards, dim), tensor)


def test_tp_split_refuses_uneven():
    with pytest.raises(ValueError, match="not divisible"):
        layouts.split_tp(torch.zeros(6, 2), 4, 0)


@pytest.mark.parametrize("vocab,div,tp,expected", [(2000, 128, 1, 2048), (2000, 128, 2, 2048), (2049, 128, 2, 2304),
                                                   (32000, 128, 8, 32768), (2048, 128, 1, 2048)])
def test_padded_vocab_size(vocab, div, tp, expected):
    assert layouts.padded_vocab_size(vocab, div, tp) == expected


def test_vocab_pad_unpad_inverse_and_zero_rows():
    emb = torch.randn(10, 4)
    padded = layouts.pad_vocab(emb, 16)
    assert padded.shape == (16, 4) and torch.equal(padded[10:], torch.zeros(6, 4))
    assert torch.equal(layouts.unpad_vocab(padded, 10), emb)


def test_extend_vocab_rows_are_mean_of_old_rows():
    emb = torch.randn(10, 4)
    extended = layouts.extend_vocab(emb, 3)
    assert torch.equal(extended[:10], emb)
    assert torch.allclose(extended[10:], emb.mean(0, keepdim=True).expand(3, 4))


@pytest.mark.parametrize("layers,pp", [(4, 1), (4, 2), (8, 4), (6, 3)])
def test_pp_layer_ranges_partition_and_invert(layers, pp):
    seen = []
    for stage in range(pp):
        ids = list(layouts.pp_layer_range(layers, pp, stage))
        for local, layer in enumerate(ids):
            assert layouts.layer_location(layer, layers, pp) == (stage, local)
        seen += ids
    assert seen == list(range(layers))


def test_pp_layer_range_refuses_uneven():
    with pytest.raises(ValueError, match="evenly"):
        layouts.pp_layer_range(5, 2, 0)


@pytest.mark.parametrize("extra,tp", [(0, 1), (0, 2), (3, 2), (20, 4), (6, 1)])
def test_vocab_rows_equal_the_slices_of_the_padded_matrix(extra, tp):
    emb = torch.randn(10, 4, dtype=torch.bfloat16)
    padded_rows = layouts.padded_vocab_size(10 + extra, 8, tp)
    full = layouts.pad_vocab(layouts.extend_vocab(emb, extra), padded_rows)
    per = padded_rows // tp
    for rank in range(tp):
        rows = layouts.vocab_rows(emb, extra, padded_rows, rank * per, (rank + 1) * per)
        assert torch.equal(rows, full[rank * per:(rank + 1) * per])
        assert rows.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()  # an owned copy
