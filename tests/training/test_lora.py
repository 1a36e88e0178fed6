"""LoRA end to end on CPU: TP2 equals TP1, resume is exact, the checkpoint holds only adapters, and the exports
(merged HF weights; a PEFT adapter directory) give the logits of the adapted model."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from megatron_patch.checkpoint.torch_dist_io import read_dcp_metadata
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.data.sft import write_demo_sft
from megatron_patch.errors import CheckpointError, ConfigError
from megatron_patch.models.tiny import CORPUS
from megatron_patch.runtime import run_on_local_ranks
from megatron_patch.training.arguments import TrainConfig
from megatron_patch.training.preflight import preflight

from .workers import lora_logits_worker, train_worker

LORA = dict(lora_rank=4, lora_alpha=8.0)
TOKENS = [5, 17, 42, 99, 7, 300, 12, 64, 250, 3, 11, 480]


def _cfg(workspace, save, **over):
    """SFT with LoRA (the demo instruction set: echo a sentence), 4 steps."""
    train = workspace["root"] / "lora_sft.jsonl"
    if not train.exists():
        write_demo_sft(CORPUS, train, limit=64)
    cfg = dict(mode="finetune", load=workspace["ckpt"], save=str(save), train_data_path=str(train),
               micro_batch_size=2, global_batch_size=4, seq_length=128, train_iters=4, lr=2e-2, min_lr=2e-3,
               lr_warmup_iters=1, seed=3, **LORA)
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def tp2_run(workspace, tmp_path_factory):
    """A TP1 run of 4 steps; a TP2 run stopped after 2 (saved) and restarted to 4."""
    root = tmp_path_factory.mktemp("lora")
    tp1 = run_on_local_ranks(train_worker, 1, _cfg(workspace, root / "tp1"), timeout=600)[0]
    first = run_on_local_ranks(train_worker, 2, _cfg(workspace, root / "tp2", tensor_model_parallel_size=2,
                                                     save_interval=2, exit_interval=2), timeout=600)[0]
    second = run_on_local_ranks(train_worker, 2, _cfg(workspace, root / "tp2", tensor_model_parallel_size=2,
                                                      save_interval=2), timeout=600)[0]
    return {"root": root, "tp1": tp1, "tp2": first + second, "ckpt": root / "tp2"}


def test_tp2_resumed_equals_tp1(tp2_run):
    tp1, tp2 = dict(tp2_run["tp1"]), dict(tp2_run["tp2"])
    assert sorted(tp2) == [1, 2, 3, 4] and sorted(tp1) == [1, 2, 3, 4]
    print(f"LoRA TP1 vs TP2 (resumed at 2): max loss difference {max(abs(tp1[s] - tp2[s]) for s in tp1):.2e}")
    for step in tp1:
        assert abs(tp1[step] - tp2[step]) <= 1e-5, (step, tp1, tp2)
    assert tp1[4] < tp1[1] - 0.05, tp1  # the adapters learn


def test_exports_refuse_the_wrong_checkpoint(tp2_run, workspace, tmp_path):
    with pytest.raises(CheckpointError, match="holds no LoRA adapters"):
        mcore_to_hf(workspace["ckpt"], tmp_path / "a", merge_lora=True)
    with pytest.raises(CheckpointError, match="holds no LoRA adapters"):
        mcore_to_hf(workspace["ckpt"], tmp_path / "b", lora_only=True)
    with pytest.raises(ConfigError, match="holds LoRA adapters only: export with --merge-lora"):
        mcore_to_hf(tp2_run["ckpt"], tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_preflight_refuses_a_rank_larger_than_a_layer(workspace, tmp_path):
    cfg = TrainConfig.from_dict({**_cfg(workspace, tmp_path / "s"), "lora_rank": 129})
    with pytest.raises(ConfigError, match="--lora-rank 129 is larger than linear_qkv"):
        preflight(cfg, 1)


def test_checkpoint_holds_only_adapters(tp2_run, workspace):
    iter_dir = tp2_run["ckpt"] / "iter_0000004"
    keys = set(read_dcp_metadata(iter_dir).state_dict_metadata)
    assert keys and all(".lora." in key for key in keys), sorted(keys)[:5]
    assert {key.rsplit(".", 1)[-1] for key in keys} == {"weight_a", "weight_b"}
    record = json.loads((iter_dir / "lora.json").read_text())
    assert record["lora"]["rank"] == 4 and record["base"].startswith(workspace["ckpt"])
    state_keys = set(read_dcp_metadata(iter_dir / "train_state").state_dict_metadata)
    params = {key for key in state_keys if key.startswith("optimizer.state.")}
    assert params and all(".lora." in key for key in params), sorted(params)[:5]


def test_merged_and_peft_exports_match_the_adapted_model(tp2_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = str(tp2_run["ckpt"])
    ours = run_on_local_ranks(lora_logits_worker, 1, ckpt, TOKENS,
                              dict(rank=4, alpha=8.0, target_modules=["linear_qkv", "linear_proj", "linear_fc1",
                                                                      "linear_fc2"]), timeout=600)[0]
    mcore_to_hf(ckpt, tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(torch.tensor([TOKENS])).logits.numpy()
    vocab = theirs.shape[-1]
    print(f"merged export vs ours: max abs logit difference {np.abs(ours[..., :vocab] - theirs).max():.2e}")
    assert np.abs(ours[..., :vocab] - theirs).max() <= 1e-4
    base = tp2_run["root"] / "base_hf"
    mcore_to_hf(json.loads((tp2_run["ckpt"] / "iter_0000004" / "lora.json").read_text())["base"], base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(plain(torch.tensor([TOKENS])).logits.numpy() - theirs).max() > 1e-3  # the adapters matter
    mcore_to_hf(ckpt, tmp_path / "adapter", lora_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed: the adapter directory's format was checked, not loaded")
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = adapted(torch.tensor([TOKENS])).logits.numpy()
    print(f"PEFT adapter vs ours: max abs logit difference {np.abs(ours[..., :vocab] - peft_logits).max():.2e}")
    assert np.abs(ours[..., :vocab] - peft_logits).max() <= 1e-4
    shutil.rmtree(base)


@pytest.mark.slow
def test_pp2_tp2_and_distributed_optimizer_equal_tp1(tp2_run, workspace, tmp_path):
    tp1 = dict(tp2_run["tp1"])
    runs = {
        "tp2pp2": run_on_local_ranks(train_worker, 4, _cfg(workspace, tmp_path / "a", tensor_model_parallel_size=2,
                                                           pipeline_model_parallel_size=2), timeout=900)[0],
        "dp2 distributed optimizer": run_on_local_ranks(
            train_worker, 2, _cfg(workspace, tmp_path / "b", use_distributed_optimizer=True), timeout=900)[0],
    }
    for name, history in runs.items():
        print(f"LoRA {name} vs TP1: max loss difference {max(abs(loss - tp1[step]) for step, loss in history):.2e}")
        for step, loss in history:
            assert abs(loss - tp1[step]) <= 1e-5, (name, step, loss, tp1)
    # The TP2 x PP2 adapters, merged and as PEFT modules (B A of each), equal the TP1 run's. (A and B alone may
    # differ more: Adam moves a weight whose gradient is at rounding level by about lr, in either direction.)
    from safetensors.torch import load_file

    for flag, weights in (("merge_lora", "model.safetensors"), ("lora_only", "adapter_model.safetensors")):
        one = load_file(mcore_to_hf(tp2_run["root"] / "tp1", tmp_path / f"tp1_{flag}", **{flag: True}) / weights)
        four = load_file(mcore_to_hf(tmp_path / "a", tmp_path / f"tp2pp2_{flag}", **{flag: True}) / weights)
        assert one.keys() == four.keys()
        if flag == "lora_only":
            one, four = ({k.removesuffix(".lora_A.weight"): t[k.replace("lora_A", "lora_B")] @ t[k]
                          for k in t if k.endswith(".lora_A.weight")} for t in (one, four))
        worst = max(float((one[k] - four[k]).abs().max()) for k in one)
        print(f"{flag} export, TP2 x PP2 vs TP1: max abs difference {worst:.2e}")
        assert worst <= 1e-5
