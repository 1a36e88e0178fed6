"""Pretraining a mixture-of-experts model on CPU (gloo, fp32, tiny Qwen2-MoE: a dense layer, a gated shared expert,
4 experts top-2): expert parallelism over 2 ranks with the alltoall dispatcher follows the EP=1 loss curve,
load-balancing loss and expert load; the loss falls; the load-balancing loss and each MoE layer's expert load (busiest
expert's tokens over the mean) reach the log and TensorBoard; a resumed EP=2 run equals the uninterrupted one (MoE
flags on a dense model: test_moe_refusals.py, by the pre-flight, which runs the ranks' own check). The distributed optimizer (sharding the optimizer
state over the data-parallel ranks, expert and dense parameters each over their own group) follows it too."""

from __future__ import annotations

import pytest

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.data.indexed import build_indexed_dataset
from megatron_patch.errors import ConfigError
from megatron_patch.runtime import run_on_local_ranks
from tests.models.moe_workers import moe_train_job

from .conftest import corpus_jsonl

STEPS = 6
ENV = {"CUDA_VISIBLE_DEVICES": "", "MEGATRON_PATCH_STRICT_DEVICE": "1"}


@pytest.fixture(scope="module")
def moe_workspace(tmp_path_factory, make_hf):
    root = tmp_path_factory.mktemp("moe_train")
    hf = make_hf("moe_train_qwen2_moe", family="qwen_moe")
    hf_to_mcore(hf, root / "mcore")
    build_indexed_dataset(corpus_jsonl(root / "corpus.jsonl"), root / "corpus", hf, progress=False)
    return {"root": root, "ckpt": str(root / "mcore"), "data": str(root / "corpus")}


def config(ws, **overrides) -> dict:
    cfg = dict(mode="pretrain", load=ws["ckpt"], data_path=[ws["data"]], split="100,0,0", seq_length=64,
               micro_batch_size=2, global_batch_size=4, train_iters=STEPS, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2,
               seed=1234, log_interval=1, moe_aux_loss_coeff=0.01)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def ep1(moe_workspace):
    tb = moe_workspace["root"] / "tb"
    return run_on_local_ranks(moe_train_job, 1, config(moe_workspace, tensorboard_dir=str(tb)), env=ENV,
                              timeout=900)[0]


@pytest.mark.parametrize("extra", [{}, {"use_distributed_optimizer": True}], ids=["ddp", "distributed-optimizer"])
def test_ep2_alltoall_follows_the_ep1_curve(moe_workspace, ep1, extra):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses, moe, local_experts = ep1
    assert local_experts == 4
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert all(step["load_balancing_loss"] > 0.5 for step in moe), moe  # ~1 for balanced routing
    assert all(1.0 <= step["expert load max/mean"] <= 4.0 for step in moe), moe  # 4 experts
    events = EventAccumulator(str(moe_workspace["root"] / "tb")).Reload()
    assert len(events.Scalars("load_balancing_loss")) == STEPS
    assert len(events.Scalars("moe/expert_load_max_over_mean_layer_3")) == STEPS
    assert "moe/expert_load_max_over_mean_layer_1" not in events.Tags()["scalars"]  # layer 1 is dense
    cfg = config(moe_workspace, expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall", **extra)
    for ep2_losses, ep2_moe, ep2_local_experts in run_on_local_ranks(moe_train_job, 2, cfg, env=ENV, timeout=900):
        assert ep2_local_experts == 2
        lm = max(abs(a[1] - b[1]) for a, b in zip(ep2_losses, losses))
        lb = max(abs(a["load_balancing_loss"] - b["load_balancing_loss"]) for a, b in zip(ep2_moe, moe))
        assert [a["expert load max/mean"] for a in ep2_moe] == pytest.approx([b["expert load max/mean"] for b in moe])
        print(f"EP=2 alltoall {extra} (2 ranks) vs EP=1: max lm loss difference {lm:.3e}, load-balancing loss {lb:.3e}")
        assert [i for i, _ in ep2_losses] == list(range(1, STEPS + 1))
        assert lm <= 1e-5 and lb <= 1e-5


@pytest.mark.slow
def test_ep2_resume_equals_uninterrupted(moe_workspace, tmp_path):
    save = tmp_path / "ckpt"
    common = dict(expert_model_parallel_size=2, save=str(save), save_interval=3)
    full = run_on_local_ranks(moe_train_job, 2, config(moe_workspace, **common, exit_interval=None), env=ENV,
                              timeout=900)[0]
    save2 = tmp_path / "ckpt2"
    run_on_local_ranks(moe_train_job, 2, config(moe_workspace, **{**common, "save": str(save2)}, exit_interval=3),
                       env=ENV, timeout=900)
    resumed = run_on_local_ranks(moe_train_job, 2, config(moe_workspace, **{**common, "save": str(save2)}), env=ENV,
                                 timeout=900)[0]
    assert [i for i, _ in resumed[0]] == list(range(4, STEPS + 1)) and resumed[2] == 2
    assert resumed[0] == full[0][3:] and resumed[1] == full[1][3:]


def test_expert_parallel_size_must_divide_data_parallel():
    from megatron_patch.training.arguments import TrainConfig

    cfg = TrainConfig.from_dict(dict(mode="pretrain", load="x", data_path=["x"], train_iters=1,
                                     expert_model_parallel_size=2, tensor_model_parallel_size=2))
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 2 does not divide the data-parallel size 1"):
        cfg.validate(world_size=2)
