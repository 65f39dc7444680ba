"""What the RL phases (GRPO, DPO) and their tools share: prompt sources, sampling and scoring a rollout, per-token
log-probs through the vocab-parallel head, the frozen reference model, and preference pairs."""
