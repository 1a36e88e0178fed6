"""PPO / GRPO / RLOO on megatron-core: ``python -m megatron_patch.rlhf.ppo`` (see ``loop``)."""
