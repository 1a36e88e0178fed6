"""HF safetensors I/O: corrupt files refused with one line naming the file, FP8 and unsigned dtypes read,
the streaming writer's files identical in content to the library's (byte for byte when given the library's order,
also from ``Pieces`` of TP shards)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_patch.checkpoint.hf import CheckpointError, HFCheckpointReader, StreamingSafetensorsWriter
from megatron_patch.checkpoint.serialization import write_all
from megatron_patch.convert.__main__ import main
from megatron_patch.mapping import Split, export_pieces, layouts, merge_for_tp, split_for_tp


def _raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Bitwise view (torch.equal is not defined for every dtype, e.g. float8)."""
    return tensor.reshape(-1).view(torch.uint8)


F32x2 = {"dtype": "F32", "shape": [2]}
CORRUPT_HEADERS = {
    "offsets past the data": ({"a": {**F32x2, "data_offsets": [4, 12]}}, 12),
    "overlapping offsets": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8),
    "offsets that do not match the shape": ({"a": {**F32x2, "data_offsets": [0, 4]}}, 4),
    "a header that is a list": ([1, 2], 0),
    "an entry without data_offsets": ({"a": F32x2}, 8),
    "data shorter than the header promises": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
    "an unknown dtype": ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 2]}}, 2),
}


@pytest.mark.parametrize("case", list(CORRUPT_HEADERS))
def test_corrupt_safetensors_is_refused_naming_the_file(tmp_path, case):
    header, data_len = CORRUPT_HEADERS[case]
    _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * data_len)
    with pytest.raises(CheckpointError) as error:
        HFCheckpointReader(tmp_path)
    assert "model.safetensors" in str(error.value) and len(str(error.value).splitlines()) == 1


def test_corrupt_safetensors_fails_hf2mcore_cleanly(make_hf, tmp_path, capsys):
    """Through the CLI: exit 1, one line on stderr, no output (not even a temporary sibling)."""
    import shutil

    hf = Path(shutil.copytree(make_hf("gqa_untied"), tmp_path / "hf"))
    _raw_safetensors(hf / "model.safetensors", {"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12)
    capsys.readouterr()
    rc = main(["hf2mcore", "--load", str(hf), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "model.safetensors" in err, err
    assert not list(tmp_path.glob("*out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("index", [{"metadata": {}}, [1], {"weight_map": {"a": "../elsewhere/model.safetensors"}}])
def test_bad_index_is_refused(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        HFCheckpointReader(tmp_path)


def test_fp8_and_unsigned_dtypes_are_read(tmp_path):
    tensors = {"e4m3": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
               "e5m2": torch.tensor([1.5, 4.0, -0.25]).to(torch.float8_e5m2),
               "u16": torch.tensor([1, 65535], dtype=torch.uint16), "u32": torch.tensor([7], dtype=torch.uint32),
               "u8": torch.tensor([3, 255], dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = HFCheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert reader.dtype(name) == tensor.dtype and reader.shape(name) == tuple(tensor.shape)
        assert torch.equal(_bytes(reader.get(name)), _bytes(tensor)), name


def test_integer_weight_is_refused(make_hf, tmp_path):
    """An int tensor where a float weight belongs: refused before any work (it used to convert)."""
    import shutil

    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    hf = Path(shutil.copytree(make_hf("gqa_untied"), tmp_path / "hf"))
    tensors = load_file(str(hf / "model.safetensors"))
    name = "model.layers.0.input_layernorm.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}.*floating point"):
        hf_to_mcore(hf, tmp_path / "out", fmt="legacy")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_shard_bytes", [2**30, 32])
def test_streaming_writer_matches_the_library(tmp_path, max_shard_bytes):
    generator = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=generator), "b": torch.randn(5, generator=generator).bfloat16(),
               "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4), "f8": torch.ones(7).to(torch.float8_e4m3fn),
               "mask": torch.tensor([True, False, True])}
    writer = StreamingSafetensorsWriter(tmp_path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                                        max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) == 1) == (max_shard_bytes == 2**30)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (len(files) > 1)
    read = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            read.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        assert torch.equal(_bytes(read[name]), _bytes(tensor)), name


def test_streaming_writer_refuses_tensors_out_of_layout(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="expected 'a'"):
        writer.add("b", torch.zeros(3))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected 'b' torch.float32 \(3,\)"):
        writer.add("b", torch.zeros(4))
    with pytest.raises(ValueError, match="only 1 of 2"):
        writer.close()


def _exported_pieces(dtype: torch.dtype):
    """HF tensors as ``Pieces`` of TP=2 shards, one per merge kind, named in the library's file order (sorted)."""
    generator = torch.Generator().manual_seed(0)
    heads, groups, d, hidden = 4, 2, 3, 6

    def shards(full, split):
        return [s.clone() for s in split_for_tp(full.to(dtype), split, 2)]

    qkv = shards(torch.randn((heads + 2 * groups) * d, hidden, generator=generator), Split.COLUMN)
    split_qkv = lambda full: list(layouts.split_qkv(full, heads, groups))  # noqa: E731
    cases = [(qkv, Split.COLUMN, split_qkv, ["a.q", "a.k", "a.v"]),
             (shards(torch.randn(hidden, 8, generator=generator), Split.ROW), Split.ROW, lambda f: [f], ["b.proj"]),
             (shards(torch.randn(8, hidden, generator=generator), Split.GATED), Split.GATED,
              lambda f: list(torch.chunk(f, 2)), ["c.gate", "c.up"]),
             (shards(torch.randn(hidden, generator=generator), Split.REPLICATED), Split.REPLICATED, lambda f: [f],
              ["d.norm"])]
    pieces = {}
    for stored, split, to_hf, names in cases:
        pieces.update(zip(names, export_pieces(stored, lambda s, split=split: merge_for_tp(s, split), to_hf)))
    return dict(sorted(pieces.items()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_writer_of_pieces_writes_the_library_bytes(tmp_path, dtype):
    pieces = _exported_pieces(dtype)
    tensors = {name: p.materialize() for name, p in pieces.items()}
    save_file(tensors, str(tmp_path / "library.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ours").mkdir()
    writer = StreamingSafetensorsWriter(tmp_path / "ours", [(n, p.dtype, p.shape) for n, p in pieces.items()])
    for name, piece in pieces.items():
        writer.add(name, piece)
    writer.close()
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


def test_write_all_resumes_short_writes_and_gathers_over_iov_max(tmp_path, monkeypatch):
    import os

    calls = []

    def short_writev(fd, buffers):  # writes at most 1000 bytes per call, as a signal or a full pipe may
        calls.append(len(buffers))
        return os.write(fd, b"".join(bytes(b) for b in buffers)[:1000])

    monkeypatch.setattr(os, "writev", short_writev)
    chunks = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]
    with open(tmp_path / "out", "wb", buffering=0) as handle:
        write_all(handle.fileno(), [memoryview(c) for c in chunks])
    assert (tmp_path / "out").read_bytes() == b"".join(chunks)
    assert len(calls) > 3 and max(calls) <= 1024
