"""TorchDistReader's direct record reads: the raw bytes of each plain ``torch.save`` record go straight into the
destination, exactly as DCP's own read would place them, and anything else falls back to DCP."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_patch.checkpoint import torch_dist, torch_dist_io
from megatron_patch.checkpoint.dcp_records import tensor_record_data
from megatron_patch.checkpoint.torch_dist_io import TorchDistReader
from megatron_patch.errors import CheckpointError

STACKED = "decoder.layers.mlp.linear_fc2.weight"


def _saved(tensor) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_record_data_points_at_the_tensor_bytes(dtype):
    tensor = torch.arange(24).to(dtype).reshape(2, 3, 4)
    buffer = _saved(tensor)
    prefix = b"x" * 13  # a record inside a larger file
    file = io.BytesIO(prefix + buffer.getvalue())
    start = tensor_record_data(file, len(prefix), len(buffer.getvalue()), dtype, (2, 3, 4))
    raw = file.getvalue()[start:start + tensor.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=dtype).reshape(2, 3, 4), tensor)


def test_record_data_follows_a_storage_offset():
    base = torch.arange(20, dtype=torch.float32)
    view = base[5:17].reshape(3, 4)  # torch.save keeps the whole storage and the view's offset
    buffer = _saved(view)
    start = tensor_record_data(buffer, 0, len(buffer.getvalue()), torch.float32, (3, 4))
    raw = buffer.getvalue()[start:start + view.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(3, 4), view)


@pytest.mark.parametrize("item, dtype, sizes", [
    (torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), torch.float32, (4, 3)),  # strided view
    (torch.zeros(3, 4), torch.float16, (3, 4)),  # another dtype
    (torch.zeros(3, 4), torch.float32, (4, 3)),  # another shape
    ({"a": torch.zeros(2)}, torch.float32, (2,)),  # not a tensor
])
def test_record_data_refuses_anything_but_the_expected_plain_tensor(item, dtype, sizes):
    buffer = _saved(item)
    assert tensor_record_data(buffer, 0, len(buffer.getvalue()), dtype, sizes) is None


def test_record_data_refuses_foreign_globals():
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    buffer = _saved(Evil())
    with pytest.raises(Exception, match="unexpected global"):
        tensor_record_data(buffer, 0, len(buffer.getvalue()), torch.float32, ())


QKV, PROJ = "decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_proj.weight"


def _write_chunks(path, tensors: dict[str, tuple[torch.Tensor, list[tuple[tuple, tuple]]]]) -> None:
    """A DCP checkpoint as DCP's FileSystemWriter lays it out (one ``torch.save`` record per chunk), with the chunks
    given per key, as a TP=2 save stores a column-split and a row-split weight."""
    state, storage = {}, {}
    with open(path / "__0_0.distcp", "wb") as out:
        for key, (tensor, chunks) in tensors.items():
            stored = TensorStorageMetadata(TensorProperties(dtype=tensor.dtype), tensor.shape, [])
            for offsets, sizes in chunks:
                piece = tensor
                for dim, (begin, length) in enumerate(zip(offsets, sizes)):
                    piece = piece.narrow(dim, begin, length)
                index = MetadataIndex(key, torch.Size(offsets), len(stored.chunks))
                stored.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                start = out.tell()
                torch.save(piece.clone(), out)
                storage[index] = _StorageInfo("__0_0.distcp", start, out.tell() - start)
            state[key] = stored
    with open(path / torch_dist.DCP_METADATA, "wb") as handle:
        pickle.dump(Metadata(state_dict_metadata=state, storage_data=storage), handle)


@pytest.fixture()
def checkpoint(tmp_path):
    """A layer-stacked bf16 key in one chunk (written by ``dcp.save`` itself), and, in a second checkpoint, a
    column-split and a row-split key in two chunks per layer pair."""
    torch.manual_seed(0)
    full = {STACKED: torch.randn(3, 6, 5).to(torch.bfloat16), QKV: torch.randn(3, 8, 4), PROJ: torch.randn(3, 4, 6)}
    with torch_dist_io._one_process():
        dcp.save({STACKED: full[STACKED]}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    (tmp_path / "split").mkdir()
    _write_chunks(tmp_path / "split", {
        QKV: (full[QKV], [((0, 0, 0), (3, 4, 4)), ((0, 4, 0), (3, 4, 4))]),
        PROJ: (full[PROJ], [((0, 0, 0), (2, 4, 3)), ((0, 0, 3), (2, 4, 3)), ((2, 0, 0), (1, 4, 6))])})
    for name in ("dcp", "split"):
        (tmp_path / name / torch_dist.CONFIG_FILE).write_text(json.dumps(torch_dist.BACKEND_CONFIG))
    return tmp_path, full


def _check_all(path, full) -> None:
    reader = TorchDistReader(path / "dcp")
    for layer in range(3):
        tensor = reader.full(f"decoder.layers.{layer}.mlp.linear_fc2.weight")
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[STACKED][layer]), layer
    reader = TorchDistReader(path / "split")
    for layer in range(3):
        assert torch.equal(reader.full(f"decoder.layers.{layer}.self_attention.linear_qkv.weight"), full[QKV][layer])
        assert torch.equal(reader.full(f"decoder.layers.{layer}.self_attention.linear_proj.weight"),
                           full[PROJ][layer])


def test_reader_copies_records_directly(checkpoint, monkeypatch):
    monkeypatch.setattr(torch_dist_io.dcp, "load", lambda *a, **k: pytest.fail("fell back to dcp.load"))
    _check_all(*checkpoint)


def test_reader_falls_back_to_dcp_for_other_records(checkpoint, monkeypatch):
    monkeypatch.setattr(torch_dist_io, "tensor_record_data", lambda *args: None)
    _check_all(*checkpoint)


def test_reader_reports_a_record_cut_short(checkpoint):
    path, _ = checkpoint
    reader = TorchDistReader(path / "dcp")
    reader.full("decoder.layers.0.mlp.linear_fc2.weight")  # the record's layout is known from here on
    data = path / "dcp" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="missing or truncated"):
        reader.full("decoder.layers.2.mlp.linear_fc2.weight")
