"""Supervised finetuning end to end on CPU: epochs set the iterations, the loss falls, a checkpoint is written."""

from __future__ import annotations

from megatron_patch.data.sft import write_demo_sft
from megatron_patch.models.tiny import CORPUS
from megatron_patch.runtime import run_on_local_ranks

from .workers import train_worker


def test_sft_epochs_and_loss(workspace, tmp_path):
    train = write_demo_sft(CORPUS, tmp_path / "train.jsonl", limit=24)
    valid = write_demo_sft(CORPUS, tmp_path / "valid.jsonl", limit=4)
    cfg = dict(mode="finetune", load=workspace["ckpt"], save=str(tmp_path / "ckpt"), train_data_path=train,
               valid_data_path=valid, seq_length=256, max_padding_length=256, sft_packing=True, micro_batch_size=1,
               global_batch_size=2, epochs=3, lr=2e-3, min_lr=2e-4, seed=1)
    history = run_on_local_ranks(train_worker, 1, cfg, timeout=600)[0]
    iterations = [it for it, _ in history]
    assert iterations[0] == 1 and len(iterations) >= 6 and iterations == list(range(1, len(iterations) + 1))
    losses = [loss for _, loss in history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(iterations[-1])
