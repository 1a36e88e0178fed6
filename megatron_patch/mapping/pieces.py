"""Where the bytes of an exported HF tensor lie in the TP shards it is merged from, so that a writer can copy them
from the (memory-mapped) shards straight into its output file, never building the merged tensor.

Every layout step between the TP shards of a megatron-core parameter and its HF tensors moves whole rows (slices
along dim 0): the TP merge concatenates the shards along dim 0 (column-parallel, vocabulary, gated) or joins each
row from one row of every shard (row-parallel, dim 1), and the rows' transforms (the q/k/v split, the [gate; up]
chunk, vocabulary unpadding) select and reorder rows. So the same functions, run on tensors of *row ids* instead of
the values, say which shard row every output row is made of; consecutive rows of one shard form one contiguous piece.
For a row-split merge each output row is one row of every shard in turn (``tp`` pieces of ``cols / tp`` values);
otherwise pieces are runs of whole rows (one per shard for ``linear_fc2``-like merges, one per query group for q).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Pieces:
    """A tensor of ``dtype`` and ``shape`` stored as runs of rows of contiguous 1-D or 2-D ``sources``.

    ``runs`` are (source index, first row, end row) in the tensor's memory order: the tensor's bytes are the runs'
    bytes one after another. A row of a 1-D source is one element.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: tuple[torch.Tensor, ...]
    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Pieces:
        """A whole tensor as one piece (made contiguous: a copy only if it is not)."""
        tensor = tensor.contiguous()
        flat = tensor.reshape(-1)
        return cls(tensor.dtype, tuple(tensor.shape), (flat,), ((0, 0, flat.numel()),) if flat.numel() else ())

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def run_bytes(self) -> int:
        """The bytes the runs hold (``nbytes`` for a consistent ``Pieces``)."""
        widths = [_row_bytes(source) for source in self.sources]
        return sum((end - start) * widths[s] for s, start, end in self.runs)

    def batches(self, max_bytes: int) -> Iterator[Pieces]:
        """The tensor's bytes in order as flat (1-D) ``Pieces`` of about ``max_bytes`` each (at least one row):
        a writer that checks the values of a batch and then writes it reads them from the CPU cache the second
        time, not from memory."""
        widths = [_row_bytes(source) for source in self.sources]
        batch: list[tuple[int, int, int]] = []
        size = 0
        for s, start, end in self.runs:
            width = widths[s]
            while start < end:
                if batch and size + width > max_bytes:
                    yield self._flat(batch, size)
                    batch, size = [], 0
                take = min(end - start, max(1, (max_bytes - size) // max(width, 1)))
                batch.append((s, start, start + take))
                size, start = size + take * width, start + take
        if batch:
            yield self._flat(batch, size)

    def _flat(self, runs: list[tuple[int, int, int]], nbytes: int) -> Pieces:
        return Pieces(self.dtype, (nbytes // self.dtype.itemsize,), self.sources, tuple(runs))

    def buffers(self) -> list[memoryview]:
        """The bytes of the tensor, in order, as memoryviews of the sources (no copy)."""
        views = [_bytes_of(source) for source in self.sources]
        widths = [_row_bytes(source) for source in self.sources]
        return [views[s][start * widths[s]:end * widths[s]] for s, start, end in self.runs]

    def regions(self) -> list[torch.Tensor]:
        """The same values as views of the sources, in the sources' order with adjacent runs joined: the fewest
        tensors to scan for a check that does not care about order (a NaN search over a row-split merge is one scan
        per shard, not one per row)."""
        joined: list[list[int]] = []
        for s, start, end in sorted(self.runs):
            if joined and joined[-1][0] == s and joined[-1][2] == start:
                joined[-1][2] = end
            else:
                joined.append([s, start, end])
        return [self.sources[s][start:end] for s, start, end in joined]

    def materialize(self) -> torch.Tensor:
        """The tensor itself (a copy; for tests and for consumers that need one)."""
        parts = [self.sources[s][start:end].reshape(-1) for s, start, end in self.runs]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype)
        return flat.view(self.shape)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    if tensor.numel() == 0:
        return memoryview(b"")
    # uint8 view: numpy has no bfloat16 / float8, and the writer wants raw (little-endian) bytes anyway.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _row_bytes(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def export_pieces(shards: list[torch.Tensor], merge: Callable[[list[torch.Tensor]], torch.Tensor],
                  to_hf: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[Pieces]:
    """``[Pieces.of(t) for t in to_hf(merge(shards))]`` without computing ``merge`` or ``to_hf`` on the values.

    Args:
        shards: the TP shards of one parameter, 1-D or 2-D, one dtype (a non-contiguous shard is copied first).
        merge: the TP merge (``merge_for_tp`` with the parameter's split).
        to_hf: full megatron tensor -> its HF tensors; must move whole rows only (every layout here does).

    Raises:
        ValueError: when ``merge`` / ``to_hf`` do not keep rows whole (the result would not be a byte copy).
    """
    shards = [shard.contiguous() for shard in shards]
    if not shards or any(s.dim() not in (1, 2) or s.dtype != shards[0].dtype for s in shards):
        raise ValueError("export_pieces takes 1-D or 2-D shards of one dtype")
    # Row ids of shard s start at first[s]; one unused id between shards keeps every run of consecutive ids
    # inside one shard.
    first, ids, next_id = [], [], 0
    for shard in shards:
        rows = shard.shape[0]
        first.append(next_id)
        run = torch.arange(next_id, next_id + rows)
        ids.append(run.reshape(rows, 1) if shard.dim() == 2 else run)
        next_id += rows + 1
    merged_ids = merge(ids)
    values = to_hf(merge([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in shards]))
    outputs = to_hf(merged_ids)
    first_ids = torch.tensor(first)
    pieces = []
    for out_ids, value in zip(outputs, values):
        if out_ids.shape[1:] != merged_ids.shape[1:] or out_ids.shape[0] != value.shape[0]:
            raise ValueError(f"a layout step that does not move whole rows: ids {tuple(out_ids.shape)} for "
                             f"{tuple(value.shape)}")
        piece = Pieces(value.dtype, tuple(value.shape), tuple(shards), _runs(out_ids.reshape(-1), first_ids))
        if piece.run_bytes() != piece.nbytes:
            raise ValueError(f"the pieces of a {tuple(value.shape)} tensor do not add up to its bytes")
        pieces.append(piece)
    return pieces


def _runs(ids: torch.Tensor, first_ids: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """Consecutive ids -> (shard, first row, end row) runs (numpy: a few calls per tensor, not per run)."""
    ids, first = ids.numpy(), first_ids.numpy()
    if ids.size == 0:
        return ()
    starts = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(np.concatenate((starts, [ids.size])))
    start_ids = ids[starts]
    shard = np.searchsorted(first, start_ids, side="right") - 1
    row = start_ids - first[shard]
    return tuple(zip(shard.tolist(), row.tolist(), (row + lengths).tolist()))
