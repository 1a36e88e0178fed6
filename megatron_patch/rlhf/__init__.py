"""RLHF: the RL math (core_algos), vocab-parallel log-probs, reward model, DPO, PPO / GRPO."""
