"""RLHF on a mixture-of-experts checkpoint (tiny Qwen2-MoE: a dense layer, a gated shared expert, 4 experts top-2) at
expert-parallel size 1: GRPO's actor and reference load it, generate with it and update it (routers and experts
included); a larger expert-parallel size is refused with one line before any process group exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.errors import ConfigError
from megatron_patch.rlhf.ppo.config import RLConfig
from megatron_patch.rlhf.ppo.setup import build_run
from megatron_patch.runtime import run_on_local_ranks
from megatron_patch.training.arguments import TrainConfig
from tests.rlhf import workers


@pytest.fixture(scope="module")
def moe_ws(tmp_path_factory, make_hf):
    root = tmp_path_factory.mktemp("moe_rl")
    hf = make_hf("moe_train_qwen2_moe", family="qwen_moe")  # the HF model of the MoE training tests (built once per session)
    hf_to_mcore(hf, root / "mcore")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{d}{(d + 1) % 10}"}) + "\n" for d in range(4)))
    return {"ckpt": str(root / "mcore"), "prompts": str(prompts)}


def _configs(ws, **cfg_over):
    cfg = dict(load=ws["ckpt"], seq_length=12, micro_batch_size=2, global_batch_size=2, train_iters=1, lr=5e-3,
               lr_decay_style="constant", weight_decay=0.0, log_interval=1, **cfg_over)
    rl = dict(algo="grpo", prompt_data_path=ws["prompts"], reward="test_low_ids", max_new_tokens=4,
              ppo_mini_batches=1, n_samples_per_prompt=2)
    return cfg, rl


def test_grpo_updates_a_moe_actor(moe_ws):
    cfg, rl = _configs(moe_ws)
    out = run_on_local_ranks(workers.rl_weights_worker, 1, cfg, rl, env={"MEGATRON_PATCH_STRICT_DEVICE": "1"},
                             timeout=600)[0]
    (_, metrics), = out["history"]
    # The reference is the actor's checkpoint, loaded into its own model: on-policy, both score every response alike.
    np.testing.assert_allclose(out["first"]["ref_logprob"], out["first"]["old_logprob"], rtol=0, atol=1e-6)
    assert metrics["actor/kl_sum"] == pytest.approx(0.0, abs=1e-6) and metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reward/std"] > 0  # the group's responses differ: GRPO has advantages to follow
    changed = {name for name in out["before"] if not np.array_equal(out["before"][name], out["after"][name])}
    for layer in (0, 2, 3):  # the MoE layers (layer 1 is dense): router, every routed expert, the shared expert
        mlp = f"decoder.layers.{layer}.mlp"
        assert {f"{mlp}.router.weight", f"{mlp}.shared_experts.linear_fc1.weight", f"{mlp}.shared_experts.gate_weight",
                *(f"{mlp}.experts.local_experts.{e}.linear_fc2.weight" for e in range(4))} <= changed, sorted(changed)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in changed


def test_expert_parallel_refused(moe_ws):
    cfg, rl = _configs(moe_ws, expert_model_parallel_size=2)
    with pytest.raises(ConfigError, match="^--expert-model-parallel-size 2: RLHF and the preference trainers run "
                                          "mixture-of-experts models at expert-parallel size 1"):
        build_run(TrainConfig.from_dict({"mode": "finetune", **cfg}), RLConfig.from_dict(rl), quiet=True)
