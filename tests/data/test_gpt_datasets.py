"""Pretraining samples through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder, with blend weights."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_patch.data.gpt import build_gpt_datasets, parse_data_path
from megatron_patch.data.loader import MicroBatchIterator


def make_dataset(prefix, docs):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def single_process_group():
    """The dataset builder coordinates ranks through torch.distributed: a one-process gloo group."""
    import torch.distributed as dist

    from megatron_patch.runtime import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blend_weights_and_samples(tmp_path, single_process_group):
    rng = np.random.RandomState(0)
    low = make_dataset(tmp_path / "low", [list(rng.randint(4, 100, size=40)) + [2] for _ in range(50)])
    high = make_dataset(tmp_path / "high", [list(rng.randint(100, 200, size=40)) + [2] for _ in range(50)])
    train, _, _ = build_gpt_datasets(["0.8", low, "0.2", high], "100,0,0", 16, 1234, 2, 256, (200, 0, 0),
                                     str(tmp_path / "cache"))
    assert len(train) >= 200
    from_low = sum(int(train[i]["tokens"][train[i]["tokens"] != 2].max() < 100) for i in range(200))
    assert 140 <= from_low <= 180  # 80% of the samples from the first prefix
    sample = train[0]
    assert sample["tokens"].shape == (16,) and sample["labels"].shape == (16,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert float(sample["loss_mask"].sum()) == 16


def test_data_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin does not exist"):
        parse_data_path([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="'a' should be a weight"):
        parse_data_path(["a", "b", "c", "d"])


def test_micro_batches_split_global_batch_over_dp():
    data = [{"x": i} for i in range(100)]
    rank0 = MicroBatchIterator(data, 2, 2, 0)
    rank1 = MicroBatchIterator(data, 2, 2, 1)
    assert [next(rank0)["x"].tolist() for _ in range(2)] == [[0, 1], [4, 5]]
    assert [next(rank1)["x"].tolist() for _ in range(2)] == [[2, 3], [6, 7]]
    resumed = MicroBatchIterator(data, 2, 2, 0, consumed_samples=4)
    assert next(resumed)["x"].tolist() == [4, 5]
