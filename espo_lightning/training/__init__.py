"""The training step: ``PolicyModule`` (module.py, the LightningModule) and what its step calls:
micro-batch planning, the old policy's scores, the shared gradient norm, step logging, the CPU heap
setting, and which keys its checkpoints hold."""
