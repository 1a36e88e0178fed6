"""Evidence that PPO, GRPO and RLOO teach the tiny model a task, measured on prompts it never saw.

The task (``rlhf.tasks``): answer a digit string with the string itself (``copy``), prompts drawn without
replacement and split once, so the held-out prompts are in neither the SFT nor the RL data and a constant answer
matches none of them. An SFT warm-up stopped early leaves a policy that gets few held-out prompts exactly right;
RL with the ``digit_match`` reward then has to raise the share of held-out prompts whose *greedy* answer is exact,
while the answers stay prompt-dependent (distinct share near the reference answers'). The tests assert the held-out
numbers the loop reports before the first and after the last iteration, never the training reward.

Slow (an SFT warm-up plus three RL runs: about 15 minutes on two shared cores); ``tests/rlhf/test_ppo.py`` checks
the evaluation itself in CI. Marked xfail (strict) until RL settings that pass are found: with the demo's settings
RL lowers the held-out exact match on this model (numbers in rlhf/README.md).
"""

from __future__ import annotations

import pytest

from megatron_patch.rlhf.examples.demo import make_tiny_checkpoint, rl_configs, sft_config
from megatron_patch.rlhf.examples.tasks import write_digit_task
from megatron_patch.runtime import run_on_local_ranks
from tests.rlhf import workers

TASK, DIGITS, SFT_ITERS, RL_ITERS = "copy", 4, 80, 20
GAIN = 0.2  # the held-out exact-match share must rise by at least this much


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    paths = write_digit_task(root / "data", TASK, DIGITS)
    base = make_tiny_checkpoint(root)
    run_on_local_ranks(workers.sft_worker, 1, sft_config(base, paths["sft"], str(root / "sft"), SFT_ITERS),
                       timeout=1800)
    return root, paths


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not reached yet: measured from the step-80 SFT checkpoint (held-out exact match "
                   "0.195), 20 iterations of PPO / GRPO / RLOO end between 0.016 and 0.18 (rlhf/README.md)")
@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_rl_raises_held_out_exact_match(warm_start, algo):
    root, paths = warm_start
    cfg, rl = rl_configs(algo, str(root / "sft"), paths["prompts"], RL_ITERS, eval_prompts=paths["eval"],
                         max_new_tokens=DIGITS + 2)
    cfg["eval_interval"] = 10
    result = run_on_local_ranks(workers.rl_worker, 1, cfg, rl, timeout=1800)[0]
    (_, before), (_, after) = result["evals"][0], result["evals"][-1]
    assert after["eval/exact_match"] >= before["eval/exact_match"] + GAIN, result["evals"]
    assert after["eval/distinct"] >= 0.9 * after["eval/reference_distinct"], result["evals"]
