"""The RL math as pure tensor functions (no model, no optimizer): estimators, losses, KL, log-probs."""
