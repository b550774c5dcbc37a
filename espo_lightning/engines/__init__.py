"""Rollout engines. ``VLLMEngine`` and ``VLLMServerEngine`` are importable from here; vLLM is imported only
when an engine starts (the server engine: only in its server process)."""
from espo_lightning.engines.base import Generation, Pending, RolloutEngine, Sampling
from espo_lightning.engines.hf import HFEngine


def __getattr__(name):
    if name == "VLLMEngine":  # lazy: importing the package must not import vLLM
        from espo_lightning.engines.vllm import VLLMEngine

        return VLLMEngine
    if name == "VLLMServerEngine":  # imports vLLM only in the server process it launches
        from espo_lightning.engines.vllm_server_engine import VLLMServerEngine

        return VLLMServerEngine
    raise AttributeError(name)


__all__ = ["Generation", "HFEngine", "Pending", "RolloutEngine", "Sampling", "VLLMEngine", "VLLMServerEngine"]
