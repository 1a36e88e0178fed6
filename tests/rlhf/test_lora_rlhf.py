"""DPO and GRPO with LoRA: the policy trains adapters only, the reference is the same stage with its adapters off (no
second model) and its log-probs equal transformers' on the base model; the adapter checkpoint exports with
``mcore2hf --merge-lora`` to an HF model whose log-probs equal the trained policy's. The model's vocabulary is padded
(2000 ids in 2048 rows), so these comparisons also check that no log-prob includes the padded columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_patch.checkpoint.torch_dist_io import read_dcp_metadata
from megatron_patch.convert.mcore_to_hf import mcore_to_hf
from megatron_patch.errors import CheckpointError, ConfigError
from megatron_patch.rlhf.examples.toy import write_toy_preferences
from megatron_patch.rlhf.ppo.config import RLConfig
from megatron_patch.rlhf.ppo.setup import _validate
from megatron_patch.rlhf.preference.dpo import DPOObjective
from megatron_patch.rlhf.preference.train_reward_model import RewardObjective
from megatron_patch.runtime import run_on_local_ranks
from megatron_patch.training.arguments import TrainConfig
from tests.rlhf import workers

STRICT = {"MEGATRON_PATCH_STRICT_DEVICE": "1"}
# vocab_size 2000 is padded to 2048 rows at conversion (zero rows: a logit of 0 each, unless masked)
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=2000)
LORA = dict(lora_rank=4, lora_alpha=8.0)
ADAPTER_SUFFIXES = (".lora.weight_a", ".lora.weight_b")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("lora_rl_ws")
    hf = make_hf("lora_rl_tiny", **SMALL)
    hf_to_mcore(hf, root / "mcore")
    train, _ = write_toy_preferences(root / "data")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{d}{(d + 1) % 10}{(d + 2) % 10}"}) + "\n" for d in range(10)))
    return {"root": root, "hf": hf, "ckpt": str(root / "mcore"), "train": train, "prompts": str(prompts)}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_sequence_logps(model, rows: dict) -> np.ndarray:
    """Summed log-probs of each row's masked labels under a transformers model."""
    with torch.no_grad():
        logits = model(torch.tensor(rows["tokens"])).logits.float()
    logps = logits.log_softmax(-1).gather(-1, torch.tensor(rows["labels"])[..., None])[..., 0]
    return (logps * torch.tensor(rows["loss_mask"])).sum(-1).numpy()


def _hf_response_logprobs(model, prompts, responses, width: int, temperature: float) -> np.ndarray:
    """``(S, width)`` log-probs of each response token given its prefix (0 past the response)."""
    out = np.zeros((len(prompts), width))
    with torch.no_grad():
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
            logps = logits.log_softmax(-1)
            for t, token in enumerate(response):
                out[i, t] = float(logps[len(prompt) - 1 + t, token])
    return out


def _check_adapter_training(result: dict, iter_dir) -> None:
    """Only adapter parameters are trainable and changed (some did); the checkpoint holds adapters only."""
    assert result["shared_reference"]  # no second model was built
    assert result["trainable"] and all(n.endswith(ADAPTER_SUFFIXES) for n in result["trainable"]), result["trainable"]
    assert result["changed"] and set(result["changed"]) <= set(result["trainable"]), result["changed"]
    keys = set(read_dcp_metadata(iter_dir).state_dict_metadata)
    assert keys and all(".lora." in key for key in keys), sorted(keys)[:4]
    assert json.loads((iter_dir / "lora.json").read_text())["lora"]["rank"] == LORA["lora_rank"]


def test_dpo_with_lora(ws, tmp_path):
    cfg = dict(load=ws["ckpt"], train_data_path=ws["train"], save=str(tmp_path / "dpo"), seq_length=32,
               micro_batch_size=4, global_batch_size=8, train_iters=2, lr=2e-2, lr_decay_style="constant",
               weight_decay=0.0, **LORA)
    result = run_on_local_ranks(workers.dpo_lora_worker, 1, cfg, 0.1, env=STRICT, timeout=600)[0]
    assert result["history"][0][1]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # B = 0: policy == reference
    _check_adapter_training(result, tmp_path / "dpo" / "iter_0000002")
    base = _hf_sequence_logps(_hf_model(ws["hf"]), result["rows"])
    reference, policy = np.array(result["reference_logps"]), np.array(result["policy_logps"])
    print(f"DPO LoRA: reference (adapters off) vs transformers' base: max abs sum-log-prob difference "
          f"{np.abs(reference - base).max():.2e}; trained policy moved by {np.abs(policy - base).max():.2e}")
    assert np.abs(reference - base).max() <= 1e-4
    assert np.abs(policy - base).max() > 1e-3  # the adapters trained
    merged = mcore_to_hf(tmp_path / "dpo", tmp_path / "merged", merge_lora=True)
    exported = _hf_sequence_logps(_hf_model(merged), result["rows"])
    print(f"DPO LoRA: merged export vs trained policy: max abs difference {np.abs(exported - policy).max():.2e}")
    assert np.abs(exported - policy).max() <= 1e-4


def test_grpo_with_lora(ws, tmp_path):
    cfg = dict(load=ws["ckpt"], save=str(tmp_path / "grpo"), seq_length=16, micro_batch_size=2, global_batch_size=4,
               train_iters=2, lr=2e-2, lr_decay_style="constant", weight_decay=0.0, **LORA)
    rl = dict(algo="grpo", prompt_data_path=ws["prompts"], reward="test_low_ids", max_new_tokens=6, ppo_mini_batches=2,
              n_samples_per_prompt=2)
    result = run_on_local_ranks(workers.rl_lora_worker, 1, cfg, rl, env=STRICT, timeout=600)[0]
    _check_adapter_training(result, tmp_path / "grpo" / "actor" / "iter_0000002")
    first = result["first"]
    mask = np.array(first["response_mask"])
    base = _hf_response_logprobs(_hf_model(ws["hf"]), first["prompts"], first["responses"], 6, 1.0)
    during = np.array(first["ref_logprob"]) * mask  # the loop's reference pass of iteration 1
    after = np.array(result["reference_logprob"]) * mask  # the same rollout, adapters off, after training
    policy = np.array(result["policy_logprob"]) * mask
    print(f"GRPO LoRA: reference (adapters off) vs transformers' base: max abs log-prob difference "
          f"{max(np.abs(during - base).max(), np.abs(after - base).max()):.2e}; trained actor moved by "
          f"{np.abs(policy - base).max():.2e}")
    assert np.abs(during - base).max() <= 1e-4 and np.abs(after - base).max() <= 1e-4
    assert np.abs(policy - base).max() > 1e-3  # the adapters trained
    merged = mcore_to_hf(tmp_path / "grpo" / "actor", tmp_path / "merged", merge_lora=True)
    exported = _hf_response_logprobs(_hf_model(merged), first["prompts"], first["responses"], 6, 1.0) * mask
    print(f"GRPO LoRA: merged export vs trained actor: max abs log-prob difference "
          f"{np.abs(exported - policy).max():.2e}")
    assert np.abs(exported - policy).max() <= 1e-4
    # An adapter checkpoint is no starting point for RLHF (its reference would be the bare base): refused up front.
    with pytest.raises(CheckpointError, match="holds LoRA adapters only .*merge them first"):
        DPOObjective(0.1).check(TrainConfig.from_dict(dict(mode="finetune", load=str(tmp_path / "grpo" / "actor"),
                                                           train_data_path=ws["train"], **LORA)))


def test_lora_refusals(ws):
    with pytest.raises(ConfigError, match="--lora-rank: the reward-model trainer trains every parameter"):
        RewardObjective().check(TrainConfig.from_dict(dict(mode="finetune", load=ws["ckpt"],
                                                           train_data_path=ws["train"], **LORA)))
    rl = RLConfig.from_dict(dict(algo="grpo", prompt_data_path=ws["prompts"], reward="digits", max_new_tokens=6,
                                 n_samples_per_prompt=2))
    base = dict(mode="finetune", load=ws["ckpt"], seq_length=16, micro_batch_size=2, global_batch_size=4,
                train_iters=1, **LORA)
    with pytest.raises(ConfigError, match="--lora-rank needs --transformer-impl local"):
        _validate(TrainConfig.from_dict({**base, "transformer_impl": "transformer_engine"}), rl)
    with pytest.raises(ConfigError, match="--lora-rank 65 is larger than linear_qkv"):
        _validate(TrainConfig.from_dict({**base, "lora_rank": 65}), rl)


@pytest.mark.slow
def test_resumed_lora_runs_equal_uninterrupted(ws, tmp_path):
    """DPO and GRPO with LoRA stopped after one step (an adapter checkpoint) and restarted equal one uninterrupted
    run: the base reloaded from lora.json's pointer, the adapters and their optimizer state from the checkpoint."""
    dpo = dict(load=ws["ckpt"], train_data_path=ws["train"], seq_length=32, micro_batch_size=4, global_batch_size=8,
               train_iters=3, lr=2e-2, lr_decay_style="cosine", lr_warmup_iters=1, weight_decay=0.0, **LORA)
    whole = run_on_local_ranks(workers.dpo_worker, 1, {**dpo, "save": str(tmp_path / "a")}, 0.1, env=STRICT)[0]
    parts = [run_on_local_ranks(workers.dpo_worker, 1, {**dpo, "save": str(tmp_path / "b"), **over}, 0.1,
                                env=STRICT)[0]["history"] for over in ({"exit_interval": 1}, {})]
    resumed = parts[0] + parts[1]
    assert [i for i, _ in resumed] == [1, 2, 3]
    worst = max(abs(got["loss"] - expected["loss"]) for (_, expected), (_, got) in zip(whole["history"], resumed))
    print(f"DPO LoRA resumed at 1 vs uninterrupted: max loss difference {worst:.2e}")
    assert worst <= 1e-6
    cfg = dict(load=ws["ckpt"], seq_length=16, micro_batch_size=2, global_batch_size=4, train_iters=3, lr=2e-2,
               lr_decay_style="constant", weight_decay=0.0, **LORA)
    rl = dict(algo="grpo", prompt_data_path=ws["prompts"], reward="test_low_ids", max_new_tokens=6,
              ppo_mini_batches=2, n_samples_per_prompt=2)
    whole = run_on_local_ranks(workers.rl_worker, 1, {**cfg, "save": str(tmp_path / "c")}, rl, env=STRICT)[0]
    parts = [run_on_local_ranks(workers.rl_worker, 1, {**cfg, "save": str(tmp_path / "d"), **over}, rl,
                                env=STRICT)[0]["history"] for over in ({"exit_interval": 1}, {})]
    resumed = parts[0] + parts[1]
    assert [i for i, _ in resumed] == [1, 2, 3]
    keys = ("reward/mean", "actor/kl_sum", "actor/pg_loss")
    worst = max(abs(got[k] - expected[k]) for (_, expected), (_, got) in zip(whole["history"], resumed) for k in keys)
    print(f"GRPO LoRA resumed at 1 vs uninterrupted: max difference of {', '.join(keys)}: {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.slow
def test_lora_dpo_tp2_and_pp2_equal_tp1(ws):
    cfg = dict(load=ws["ckpt"], train_data_path=ws["train"], seq_length=32, micro_batch_size=4, global_batch_size=8,
               train_iters=3, lr=2e-2, lr_decay_style="constant", weight_decay=0.0, **LORA)
    one = run_on_local_ranks(workers.dpo_worker, 1, cfg, 0.1, env=STRICT)[0]["history"]
    for over in ({"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}):
        two = run_on_local_ranks(workers.dpo_worker, 2, {**cfg, **over}, 0.1, env=STRICT)[0]["history"]
        worst = max(abs(a["loss"] - b["loss"]) for (_, a), (_, b) in zip(one, two, strict=True))
        print(f"DPO LoRA {over} vs TP1: max loss difference {worst:.2e}")
        assert worst <= 1e-5
    assert one[-1][1]["loss"] < one[0][1]["loss"] - 0.01  # the adapters learn
