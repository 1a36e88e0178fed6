"""Reward model on the toy preference task: learns (held-out accuracy), TP=2 and PP=2 equal TP=1, checkpoints."""

from __future__ import annotations

import json

import pytest

from megatron_patch.rlhf.examples.toy import make_toy_pairs, write_toy_preferences
from megatron_patch.rlhf.preference.reward_model import REWARD_MARKER
from megatron_patch.runtime import run_on_local_ranks
from tests.rlhf import workers

# Every run checks device placement as a GPU would (runtime/strict.py).
STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1"}


@pytest.fixture(scope="module")
def rm_workspace(tmp_path_factory, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("rm_ws")
    hf_to_mcore(make_hf("rm_tiny"), root / "mcore")
    train, valid = write_toy_preferences(root / "data")
    return {"root": root, "ckpt": str(root / "mcore"), "train": train, "valid": valid}


def _cfg(ws, **over) -> dict:
    return {**dict(load=ws["ckpt"], train_data_path=ws["train"], valid_data_path=ws["valid"], seq_length=32,
                   micro_batch_size=4, global_batch_size=16, train_iters=3, lr=1e-3, lr_decay_style="constant",
                   weight_decay=0.0, log_interval=1), **over}


def test_toy_pairs_are_built_from_the_corpus():
    pairs = make_toy_pairs()
    assert len(pairs) > 1000
    assert all(p["chosen"] != p["rejected"] and len(p["chosen"].split()) == len(p["rejected"].split()) for p in pairs)


def test_reward_model_learns_and_saves_a_marked_checkpoint(rm_workspace, tmp_path):
    out = run_on_local_ranks(workers.reward_model_worker, 1, _cfg(rm_workspace, save=str(tmp_path / "rm")),
                             env=STRICT, timeout=600)[0]
    losses = [loss for _, loss, _ in out["history"]]
    assert losses[-1] < losses[0]
    final = out["evals"][-1][1]
    assert final["accuracy"] >= 0.9 and final["margin"] > 0
    iter_dir = tmp_path / "rm" / "iter_0000003"
    assert json.loads((iter_dir / REWARD_MARKER).read_text())["head"] == "scalar"
    # Resuming from the reward checkpoint loads the trained head: held-out accuracy holds without training.
    again = run_on_local_ranks(workers.reward_model_worker, 1,
                               _cfg(rm_workspace, load=str(tmp_path / "rm"), train_iters=1, lr=1e-12), env=STRICT,
                               timeout=600)[0]
    assert again["history"][0][2] >= 0.8
    _check_hf_export(tmp_path / "rm", tmp_path / "hf_rm")


def _check_hf_export(rm_dir, hf_dir):
    """transformers loads the export as a sequence-classification model whose scores equal ours to 1e-4."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from megatron_patch.data.preference import PreferenceDataset, collate_preference_pairs
    from megatron_patch.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(rm_dir / "iter_0000003" / "hf_assets")
    data = PreferenceDataset(write_toy_preferences(rm_dir.parent / "export_data")[1], tokenizer, seq_length=32)
    batch = collate_preference_pairs([data[i] for i in range(4)])
    ours = run_on_local_ranks(workers.export_and_score_worker, 1, str(rm_dir), str(hf_dir), batch["tokens"].tolist(),
                              batch["last_index"].tolist(), timeout=600)[0]
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch["tokens"]).logits[:, 0]
    torch.testing.assert_close(theirs, torch.tensor(ours), atol=1e-4, rtol=0)
    assert len(set(ours)) > 1  # distinct sequences, distinct scores: the comparison is not between constants


@pytest.fixture(scope="module")
def single_rank_run(rm_workspace):
    return run_on_local_ranks(workers.reward_model_worker, 1, _cfg(rm_workspace), env=STRICT, timeout=600)[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_parallel_runs_equal_tp1(rm_workspace, single_rank_run, tp, pp):
    reference = single_rank_run
    parallel = run_on_local_ranks(workers.reward_model_worker, 2,
                                  _cfg(rm_workspace, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                                  env=STRICT, timeout=600)
    for rank_result in parallel:
        for (_, ref_loss, ref_acc), (_, loss, acc) in zip(reference["history"], rank_result["history"]):
            assert loss == pytest.approx(ref_loss, abs=1e-4) and acc == ref_acc


def test_resumed_reward_model_equals_uninterrupted(rm_workspace, tmp_path):
    cfg = _cfg(rm_workspace, valid_data_path=None, train_iters=4, lr_decay_style="cosine", lr_warmup_iters=1)
    whole = run_on_local_ranks(workers.reward_model_worker, 1, {**cfg, "save": str(tmp_path / "a")}, env=STRICT,
                               timeout=600)[0]
    first = run_on_local_ranks(workers.reward_model_worker, 1,
                               {**cfg, "save": str(tmp_path / "b"), "exit_interval": 2}, env=STRICT, timeout=600)[0]
    rest = run_on_local_ranks(workers.reward_model_worker, 1, {**cfg, "save": str(tmp_path / "b")}, env=STRICT,
                              timeout=600)[0]
    assert [h[0] for h in first["history"]] == [1, 2] and [h[0] for h in rest["history"]] == [3, 4]
    for expected, got in zip(whole["history"], first["history"] + rest["history"]):
        assert got[1] == pytest.approx(expected[1], abs=1e-6) and got[2] == expected[2]
