"""A run's plumbing around the trainer: preemption-safe checkpoints, one-line CLI errors, and the
distributed helpers."""
