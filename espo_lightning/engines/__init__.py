"""Rollout engines. ``VLLMEngine`` is importable from here but imports vLLM only when constructed."""
from espo_lightning.engines.base import Generation, RolloutEngine, Sampling
from espo_lightning.engines.hf import HFEngine


def __getattr__(name):
    if name == "VLLMEngine":  # lazy: importing the package must not import vLLM
        from espo_lightning.engines.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(name)


__all__ = ["Generation", "HFEngine", "RolloutEngine", "Sampling", "VLLMEngine"]
