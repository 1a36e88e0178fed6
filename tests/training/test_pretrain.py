"""Pretraining on CPU (gloo, fp32, tiny llama): the loss falls; TP=2 and PP=2 follow the TP=1 PP=1 loss curve;
a resumed run equals the uninterrupted one; a save killed midway leaves the previous checkpoint; a trained
checkpoint converts back to HF."""

from __future__ import annotations

import json

import pytest

from megatron_patch.checkpoint.checksums import MANIFEST, verify_manifest
from megatron_patch.errors import WorkerError
from megatron_patch.runtime import run_on_local_ranks

from .workers import convert_back_worker, train_and_die_worker, train_worker

STEPS = 10
# Every run here also checks device placement as a GPU would (runtime/strict.py; same numbers as the plain path).
STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1"}


def config(ws, **overrides) -> dict:
    cfg = dict(
        mode="pretrain", load=ws["ckpt"], data_path=[ws["data"]], split="100,0,0", seq_length=64,
        micro_batch_size=2, global_batch_size=4, train_iters=STEPS, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2,
        seed=1234, log_interval=1,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def baseline(workspace, tmp_path_factory):
    """TP=1 PP=1, saving at iteration 5 and 10."""
    out = tmp_path_factory.mktemp("baseline")
    cfg = config(workspace, save=str(out / "ckpt"), save_interval=5, tensorboard_dir=str(out / "tb"))
    losses = run_on_local_ranks(train_worker, 1, cfg, timeout=600, env=STRICT)[0]
    return {"losses": dict(losses), "save": out / "ckpt", "out": out}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[k] - b[k]) for k in a)


def test_loss_falls_and_logs(baseline):
    losses = baseline["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, losses
    assert list((baseline["out"] / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((baseline["save"] / "train_config.json").read_text())
    assert saved["tensor_model_parallel_size"] == 1 and saved["train_iters"] == STEPS
    assert (baseline["save"] / "latest_checkpointed_iteration.txt").read_text() == "10"
    # Each save carries checksum manifests (weights, and train_state/ apart) that match its files.
    for iteration in ("iter_0000005", "iter_0000010"):
        iter_dir = baseline["save"] / iteration
        listed = json.loads((iter_dir / MANIFEST).read_text())["files"]
        assert any(name.endswith(".distcp") for name in listed) and not any(n.startswith("train_state/") for n in listed)
        assert verify_manifest(iter_dir) and verify_manifest(iter_dir / "train_state")


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, {}), (1, 2, {}), (1, 1, {"recompute_granularity": "full"})],
                         ids=["tp2", "pp2", "dp2-full-recompute"])
def test_parallel_loss_curve_matches(workspace, baseline, tp, pp, extra):
    cfg = config(workspace, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **extra)
    results = run_on_local_ranks(train_worker, 2, cfg, timeout=600, env=STRICT)
    for losses in results:  # every rank reports the same curve
        diff = max_diff(dict(losses), baseline["losses"])
        print(f"TP={tp} PP={pp} {extra} (2 ranks) vs TP=1 PP=1: max loss difference over {STEPS} steps {diff:.3e}")
        assert diff <= 1e-4


def test_killed_save_keeps_previous_checkpoint_and_resume_matches(workspace, baseline, tmp_path):
    save = tmp_path / "ckpt"
    cfg = config(workspace, save=str(save), save_interval=5)
    with pytest.raises(WorkerError):
        run_on_local_ranks(train_and_die_worker, 1, cfg, timeout=600)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert (save / ".iter_0000010.tmp").is_dir() and not (save / "iter_0000010").exists()
    # Restarting the same command loads iteration 5 and repeats the uninterrupted run step for step.
    resumed = dict(run_on_local_ranks(train_worker, 1, cfg, timeout=600)[0])
    assert sorted(resumed) == list(range(6, STEPS + 1))
    expected = {k: v for k, v in baseline["losses"].items() if k > 5}
    diff = max_diff(resumed, expected)
    print(f"resumed vs uninterrupted: max loss difference over steps 6-10 {diff:.3e}")
    assert diff == 0.0
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert not (save / ".iter_0000010.tmp").exists()


def test_trained_checkpoint_converts_to_hf(baseline, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM


    hf_out = tmp_path / "hf"
    iteration, megatron_logits = run_on_local_ranks(convert_back_worker, 1, str(baseline["save"]), str(hf_out),
                                                    [1, 5, 9, 13], timeout=300)[0]
    assert iteration == STEPS
    model = AutoModelForCausalLM.from_pretrained(hf_out)
    with torch.no_grad():
        hf_logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    vocab = hf_logits.shape[-1]
    assert torch.allclose(hf_logits, torch.from_numpy(megatron_logits)[..., :vocab], atol=1e-4)

