"""Keeping vLLM's per-rollout log lines out of the training output."""
from __future__ import annotations

import logging


class _QuietReload(logging.Filter):
    """Drops the lines vLLM prints on every in-place weight reload (one rollout each): the notice
    that rotary embeddings have no weights to load, and the reload/prefix-cache timings."""

    NOISE = ("Failed to load weights", "Reloading and processing weights took", "Successfully reset prefix cache")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


# The vLLM modules that log on every weight reload (vLLM 0.32); names that do not exist are harmless.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")


def quiet_reload_logs() -> None:
    """Attach the filter to the loggers that speak on every weight reload (idempotent)."""
    for name in _RELOAD_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietReload) for f in logger.filters):
            logger.addFilter(_QuietReload())
