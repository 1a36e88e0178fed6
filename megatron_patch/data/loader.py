"""Micro-batches in a resumable order: the sample index is a function of (consumed samples, DP rank) only."""

from __future__ import annotations

import torch

from ..errors import DataError


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


class MicroBatchIterator:
    """Yields micro-batches of a data-parallel rank, starting after ``consumed_samples``.

    A global batch of ``global_batch_size`` consecutive sample indices is split into micro-batches; micro-batch
    ``m`` of DP rank ``r`` holds indices ``start + m*mbs*dp + r*mbs + [0, mbs)``. Wraps around the dataset.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_size: int, dp_rank: int, consumed_samples: int = 0):
        if len(dataset) == 0:
            raise DataError("the dataset has no samples")
        self.dataset, self.mbs, self.dp, self.rank = dataset, micro_batch_size, dp_size, dp_rank
        self.consumed = consumed_samples  # counts samples of all DP ranks

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed + self.rank * self.mbs
        indices = [(start + i) % len(self.dataset) for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp
        return collate([self.dataset[i] for i in indices])
