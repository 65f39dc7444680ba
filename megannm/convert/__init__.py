"""Checkpoint conversion through one hub, the consolidated safetensors form (see DESIGN.md section 7)."""
