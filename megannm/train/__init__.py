"""Training: the DeepSpeed engine built from a recipe, the loop, checkpoints, logs and preemption signals."""
