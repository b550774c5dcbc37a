"""The rollout engine interface: turn prompt token ids into sampled completions.

Engines are chosen in YAML by ``class_path`` (``espo_lightning.engines.HFEngine`` or
``espo_lightning.engines.VLLMEngine``). The DataModule calls ``sync_weights`` before every
rollout so the engine samples from the current policy, then ``generate``."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one ``generate`` call."""

    n: int = 1  # completions per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    greedy: bool = False  # argmax decoding (validation); ignores temperature and top_p
    seed: int | None = None  # per-call seed; engines derive per-request seeds from it
    # One seed per prompt (evaluation): prompt p's samples then depend on its own seed only, not on
    # the other prompts of the call. Honoured by engines with ``per_prompt_seeds``; overrides ``seed``.
    prompt_seeds: tuple[int, ...] | None = None


@dataclass
class Generation:
    """Completions of P prompts x n samples, prompt-major: entry ``p * n + j`` is sample j of prompt p."""

    token_ids: list[list[int]]  # sampled tokens, EOS included when generated, no padding
    truncated: list[bool]  # True where generation stopped at max_new_tokens without EOS
    logprobs: list[list[float]] | None = None  # the engine's log-prob of each sampled token
    # The weights it sampled from, as the engine knows them (the ``version`` of the last
    # ``sync_weights``); None: the engine does not track it (it samples from the live policy).
    policy_version: int | None = None
    # Seconds the engine spent on it, from the request to the answer, when it generates in a process of
    # its own (``submit``: the trainer may have trained meanwhile); None: the caller's wait is the time.
    seconds: float | None = None


class Pending:
    """A generation submitted with ``RolloutEngine.submit``; ``result`` waits for it."""

    def __init__(self, future, describe: str = "generation"):
        self._future, self.describe = future, describe

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Generation:
        """The generation, once done (the same object on every call), or the error that ended it."""
        return self._future.result(timeout)


def stop_token_ids(policy, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and each EOS id of the model's generation
    config (chat models often list several, e.g. ``<|im_end|>`` beside ``<|endoftext|>``). Stopping
    on the tokenizer's alone runs such models to ``max_new_tokens``."""
    ids = []
    config = getattr(policy, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


class RolloutEngine(ABC):
    """Generates completions from the current policy."""

    # Whether ``generate`` honours ``Sampling.prompt_seeds``; evaluation calls an engine without it
    # once per prompt, with that prompt's seed, so that samples never depend on the batch.
    per_prompt_seeds: bool = False
    # Whether ``generate`` runs the trainer's own policy module, and so needs the training step's
    # precision context (autocast under bf16-mixed). An engine with weights of its own (vLLM) runs
    # outside it: autocast would silently downcast the fp32 ops it runs outside CUDA graphs.
    uses_trainer_precision: bool = True
    # Whether ``submit`` generates in the background (its own process) while the trainer trains:
    # what ``data.max_staleness`` > 0 needs.
    supports_submit: bool = False
    # What the caller is generating for ("rollout 3", "evaluation"): engines name it in errors.
    activity: str = "generating"

    def setup(self, policy: torch.nn.Module, tokenizer) -> None:
        """Called once before the first rollout, with the (possibly sharded) policy."""

    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Make the engine sample from ``policy``'s current weights. Called before every rollout;
        ``version`` (the trainer's global step) labels them in the ``Generation``s that follow."""

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, policy: torch.nn.Module) -> Generation:
        """Sample ``sampling.n`` completions for each prompt (token ids without padding)."""

    def submit(self, prompt_ids: list[list[int]], sampling: Sampling) -> Pending:
        """Start ``generate`` in the background with the weights the engine holds now; the trainer
        may update its policy meanwhile. Only engines with ``supports_submit``."""
        # Not an unfinished hook: engines that generate in the trainer's process have no background
        # (the DataModule refuses data.max_staleness with them before any call reaches here).
        raise TypeError(f"{type(self).__name__} cannot generate in the background (supports_submit is False)")

    def release(self) -> None:
        """Hand memory back to training: called after a rollout's generation and after an
        evaluation. The next ``sync_weights`` or ``generate`` takes it again."""

    def teardown(self) -> None:
        """Release the engine's resources (memory, processes)."""
