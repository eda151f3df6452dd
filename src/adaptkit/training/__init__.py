"""The trainer (accelerate), its config and its checkpoints."""
