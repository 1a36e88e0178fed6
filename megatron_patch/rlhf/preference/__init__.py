"""The reward model and the preference trainers (reward model, DPO) over one preference loop."""
