"""``export_pieces`` / ``Sharding.megatron_to_hf_pieces``: the byte runs of every exported HF tensor, per row kind x
TP, are exactly the tensor the merge-then-export path builds (values and bytes, fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.errors import CheckpointError
from megatron_patch.mapping import Entry, Pieces, Split, export_pieces, merge_for_tp, split_for_tp
from megatron_patch.mapping.checks import NonFiniteGuard

from .test_sharding import KINDS, _case, _sharding


def _stored_shards(kind: str, tp: int, dtype: torch.dtype):
    row, hf, arch, _ = _case(kind)
    sharding = _sharding([row], tp, arch)
    entry = Entry(row, 0 if row.is_layer_row else None, row.megatron)
    full = sharding.full_megatron_tensor(entry, hf).to(dtype)
    # Each shard its own storage, as in a rank file.
    return sharding, entry, [shard.clone() for shard in split_for_tp(full, row.split, tp)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_pieces_are_the_exported_tensors(kind, tp, dtype):
    sharding, entry, shards = _stored_shards(kind, tp, dtype)
    expected = dict(sharding.megatron_to_hf(lambda e: merge_for_tp(shards, entry.row.split)))
    pieces = dict(sharding.megatron_to_hf_pieces(lambda e: shards))
    assert list(pieces) == list(expected)
    for name, tensor in expected.items():
        got = pieces[name]
        assert (got.dtype, got.shape, got.nbytes) == (tensor.dtype, tuple(tensor.shape), tensor.nbytes), name
        assert torch.equal(got.materialize(), tensor), (kind, tp, name)
        assert b"".join(got.buffers()) == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        # The regions hold the same values (in another order): what a scan over the values needs.
        assert sorted(torch.cat([r.reshape(-1) for r in got.regions()]).tolist()) == sorted(tensor.reshape(-1).tolist())


def test_row_split_pieces_are_rows_and_other_splits_whole_runs():
    _, entry, shards = _stored_shards("row", 2, torch.float32)
    (row_split,) = export_pieces(shards, lambda s: merge_for_tp(s, Split.ROW), lambda full: [full])
    assert len(row_split.runs) == 2 * shards[0].shape[0] and len(row_split.regions()) == 2
    _, entry, shards = _stored_shards("column", 2, torch.float32)
    (column,) = export_pieces(shards, lambda s: merge_for_tp(s, Split.COLUMN), lambda full: [full])
    assert column.runs == ((0, 0, shards[0].shape[0]), (1, 0, shards[1].shape[0]))


def test_a_layout_step_that_mixes_values_within_rows_is_refused():
    shards = [torch.zeros(4, 6), torch.zeros(4, 6)]
    with pytest.raises(ValueError, match="does not move whole rows"):
        export_pieces(shards, lambda s: merge_for_tp(s, Split.COLUMN), lambda full: [full.t()])


def test_a_whole_tensor_is_one_piece():
    tensor = torch.arange(12.0).reshape(3, 4).t()  # not contiguous: made so
    pieces = Pieces.of(tensor)
    assert len(pieces.runs) == 1 and torch.equal(pieces.materialize(), tensor)


def test_non_finite_values_in_any_piece_are_found():
    _, entry, shards = _stored_shards("row", 2, torch.float32)
    shards[1][3, 1] = float("nan")
    shards[0][0, 0] = float("inf")
    (pieces,) = export_pieces(shards, lambda s: merge_for_tp(s, Split.ROW), lambda full: [full])
    with pytest.raises(CheckpointError, match="holds 1 NaN and 1 Inf"):
        NonFiniteGuard("test")("w", pieces)


@pytest.mark.parametrize("max_bytes", [1, 40, 100, 10**6])
@pytest.mark.parametrize("kind", ["row", "qkv", "vocab", "replicated"])
def test_batches_are_the_bytes_in_order_within_the_size(kind, max_bytes):
    sharding, entry, shards = _stored_shards(kind, 2, torch.float32)
    for _, pieces in sharding.megatron_to_hf_pieces(lambda e: shards):
        batches = list(pieces.batches(max_bytes))
        assert b"".join(b"".join(batch.buffers()) for batch in batches) == b"".join(pieces.buffers())
        widths = [s[0].nbytes for s in pieces.sources]
        for batch in batches:
            assert batch.nbytes == batch.run_bytes() and batch.shape == (batch.nbytes // 4,)
            assert batch.nbytes <= max_bytes or (len(batch.runs) == 1 and batch.nbytes == widths[batch.runs[0][0]])
