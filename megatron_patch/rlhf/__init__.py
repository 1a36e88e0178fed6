"""RLHF on megatron-core, by role:

  - ``algos``: the RL math as pure tensor functions (estimators, losses, KL; registries chosen by name) and the
    vocab-parallel log-probs;
  - ``ppo``: the PPO / GRPO / RLOO loop (``python -m megatron_patch.rlhf.ppo``): config, setup, rollout and
    experience, rewards (built-in verifiers and ``py:FILE:FUNC``), losses, held-out evaluation;
  - ``preference``: the reward model and the preference trainers (reward model, DPO);
  - ``examples``: the CPU demo, the InstructGPT pipeline, toy tasks with held-out prompt sets;
  - ``roles`` (the models of a run: actor, critic, reference, reward model), ``schedule_utils`` and ``export``,
    shared by the trainers.
"""
