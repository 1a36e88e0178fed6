"""Training: arguments (typed config), model/optimizer/scheduler setup, the loop, checkpointing, logging."""
