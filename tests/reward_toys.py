"""Reward functions for the worker-pool tests. They live in a module (not inside a test) because
the pool's spawned workers import them by name, as they import functions named in configs."""
from __future__ import annotations

import os
import time

from espo_lightning.rewards.math import completion_text


def slow_on_stall(prompts, completions, **kw):
    """1.0 per completion; a completion reading "stall" sleeps far past any test timeout first."""
    out = []
    for c in completions:
        if completion_text(c) == "stall":
            time.sleep(600)
        out.append(1.0)
    return out


def length_reward(prompts, completions, **kw):
    return [float(len(completion_text(c))) for c in completions]


def raises_on_bad(prompts, completions, **kw):
    if any(completion_text(c) == "bad" for c in completions):
        raise KeyError("no gold answer")
    return [0.5] * len(completions)


def dies_on_crash(prompts, completions, **kw):
    if any(completion_text(c) == "crash" for c in completions):
        os._exit(3)  # as a segfaulting verifier would
    return [0.0] * len(completions)


def returns_text(prompts, completions, **kw):
    return ["yes"] * len(completions)


def pid_reward(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)


class StallOnPrompt:
    """The completion's length in characters, except that completions of one prompt stall (a
    verifier hanging on one problem). A class instance, as configs give parameterised rewards."""

    def __init__(self, prompt: str):
        self.prompt = prompt

    def __call__(self, prompts, completions, **kw):
        if any(p == self.prompt for p in prompts):
            time.sleep(600)
        return [float(len(c)) for c in completions]


def varies_by_rank(prompts, completions, **kw):
    """On rank 0 every prompt group (of 2) has reward variance; on rank 1 only the first group of
    each call: rank 1 needs more sampling rounds than rank 0."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    return [float(i % 2) if rank == 0 or i < 2 else 0.0 for i in range(len(completions))]
