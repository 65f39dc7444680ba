"""Training phases: one objective each over the same engine and model (pretrain, sft, grpo, dpo)."""
