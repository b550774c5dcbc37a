"""Keeping vLLM's per-rollout log lines out of the training output."""
from __future__ import annotations

import logging

from espo_lightning.engines.vllm_weights import is_rotary_notice


class _QuietReload(logging.Filter):
    """Drops the lines vLLM prints on every in-place weight reload (one rollout each): the rotary
    embedding's notice that it has no weights to load, and the reload/prefix-cache timings. Every
    other layer's "Failed to load weights" passes: that layer kept stale (at first, random) weights,
    and the sync raises on it (``vllm_weights.LoadFailures``)."""

    NOISE = ("Reloading and processing weights took", "Successfully reset prefix cache")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Failed to load weights" in message:
            return not is_rotary_notice(message)
        return not any(text in message for text in self.NOISE)


# The vLLM modules that log on every weight reload (vLLM 0.32); names that do not exist are harmless.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")


def quiet_reload_logs() -> None:
    """Attach the filter to the loggers that speak on every weight reload (idempotent)."""
    for name in _RELOAD_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietReload) for f in logger.filters):
            logger.addFilter(_QuietReload())
