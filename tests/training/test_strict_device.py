"""Training under the strict device check (runtime/strict.py) fails on each misplacement seen on a GPU machine,
planted back into the loop; the plain CPU path accepts the same code (which is why the check exists). The clean
loop runs strict in test_pretrain.py (TP1, TP2, PP2, DP2 with recompute)."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_patch.errors import WorkerError
from megatron_patch.runtime import run_on_local_ranks

from .test_pretrain import config
from .workers import planted_train_worker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is inactive on a CUDA machine")

STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1"}


@pytest.mark.parametrize("planted,op", [
    ("host reduce_loss", "Tensor.add_"),  # the H200 failure: a CUDA loss added into a CPU accumulator
    ("host batch", "embedding"),  # token ids left on the host
    ("unplaced model", "embedding"),  # the model never moved (use_cpu_initialization=True)
])
def test_strict_check_catches_planted_misplacement(workspace, planted, op):
    cfg = config(workspace, train_iters=1, lr_warmup_iters=0)
    with pytest.raises(WorkerError, match=rf"DeviceMismatchError: [\w.]*{re.escape(op)}: "):
        run_on_local_ranks(planted_train_worker, 1, cfg, planted, env=STRICT, timeout=600)


def test_plain_cpu_path_misses_the_host_reduce_loss(workspace):
    cfg = config(workspace, train_iters=1, lr_warmup_iters=0)
    [[(iteration, loss)]] = run_on_local_ranks(planted_train_worker, 1, cfg, "host reduce_loss", timeout=600)
    assert iteration == 1 and loss > 0
