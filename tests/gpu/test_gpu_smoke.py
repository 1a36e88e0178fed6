"""On a CUDA machine (skipped elsewhere): the model, its gradient buffers and optimizer state live on the GPU; bf16
pretraining runs and its loss falls; generation runs there and its fp32 logits match transformers on the host.
toolkits/gpu_check.sh runs this file as its last step."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_patch.runtime import run_on_local_ranks

from .workers import logits_and_generation_on_gpu, train_on_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENS = [1, 5, 9, 13, 200, 17, 42, 7]


@pytest.fixture(autouse=True)
def spawned_ranks(monkeypatch):
    # A forked rank would inherit this process's CUDA driver state (CUDA is not fork-safe): start fresh ones.
    monkeypatch.setenv("MEGATRON_PATCH_START_METHOD", "spawn")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.data.indexed import build_indexed_dataset
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import CORPUS, make_hf_checkpoint

    root = tmp_path_factory.mktemp("gpu_ws")
    make_hf_checkpoint(root / "hf", get_family("llama").flavor("tiny"), seed=0)
    hf_to_mcore(root / "hf", root / "mcore")
    with open(root / "corpus.jsonl", "w") as out:
        out.writelines(json.dumps({"text": line}) + "\n" for line in CORPUS.read_text().splitlines() if line.strip())
    build_indexed_dataset(root / "corpus.jsonl", root / "corpus_text_document", root / "hf", progress=False)
    return root


def test_bf16_pretraining_lives_on_the_gpu(workspace):
    cfg = dict(mode="pretrain", load=str(workspace / "mcore"), data_path=[str(workspace / "corpus_text_document")],
               split="100,0,0", seq_length=128, micro_batch_size=4, global_batch_size=8, train_iters=20, lr=3e-3,
               min_lr=3e-4, lr_warmup_iters=2, seed=1234, log_interval=5, bf16=True)
    report = run_on_local_ranks(train_on_gpu, 1, cfg, timeout=600)[0]
    assert report["param_devices"] == ["cuda"] and report["param_dtype"] == "torch.bfloat16"
    assert report["grad_buffer_devices"] == ["cuda"]
    assert report["optimizer_state_devices"] == ["cuda"]
    losses = report["losses"]
    assert all(loss == loss for loss in losses), losses  # no NaN
    assert losses[-1] < losses[0] - 0.5, losses


def test_generation_on_the_gpu_matches_transformers_logits(workspace):
    from transformers import AutoModelForCausalLM

    result = run_on_local_ranks(logits_and_generation_on_gpu, 1, str(workspace / "mcore"), TOKENS, 8, timeout=600)[0]
    assert result["model_device"] == "cuda"
    assert 1 <= len(result["completion"]) <= 8
    model = AutoModelForCausalLM.from_pretrained(workspace / "hf", dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([TOKENS])).logits
    assert (result["logits"] - reference).abs().max().item() <= 1e-3
