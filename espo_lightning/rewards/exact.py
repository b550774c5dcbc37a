"""Exact matches for tasks whose answer is a short literal: the whole first line (the embedded
addition task: "82"), or the last number of a worked response (chained addition: "...,46+56=102")."""
from __future__ import annotations

import re
from typing import Any

from espo_lightning.rewards.math import completion_text

__all__ = ["exact_match", "last_number_match"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts: list[str] | None = None, completions: list[Any] | None = None,
                answer: list[Any] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's first line, whitespace stripped, equals the stripped answer; else 0.0.

    Leading whitespace is dropped before cutting at the first newline, so ``"\\n82\\nmore"`` reads
    as ``"82"``. Never None: every completion can be scored.

    Args:
        prompts: the prompts (unused; part of the reward-function convention).
        completions: generated texts (or TRL conversational message lists), one per row.
        answer: the dataset's answer column, one per row (non-strings are compared via ``str``).
        **kwargs: other dataset columns (ignored).
    """
    del prompts, kwargs
    _check("exact_match", completions, answer)
    rewards = []
    for completion, gold in zip(completions, answer):
        first_line = completion_text(completion).strip().split("\n", 1)[0].strip()
        rewards.append(1.0 if first_line == str(gold).strip() else 0.0)
    return rewards


def last_number_match(prompts: list[str] | None = None, completions: list[Any] | None = None,
                      answer: list[Any] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the last number in the completion (``-?digits[.digits]``) is the stripped answer
    string; else 0.0, also when the completion has no number. Only the final answer counts, as for
    math data: the working before it is not checked. Never None.

    Args:
        prompts: the prompts (unused; part of the reward-function convention).
        completions: generated texts (or TRL conversational message lists), one per row.
        answer: the dataset's answer column, one per row (non-strings are compared via ``str``).
        **kwargs: other dataset columns (ignored).
    """
    del prompts, kwargs
    _check("last_number_match", completions, answer)
    rewards = []
    for completion, gold in zip(completions, answer):
        numbers = _NUMBER.findall(completion_text(completion))
        rewards.append(1.0 if numbers and numbers[-1] == str(gold).strip() else 0.0)
    return rewards


def _check(name: str, completions, answer) -> None:
    if completions is None or answer is None:
        raise ValueError(f"{name} needs completions= and answer= (the dataset's answer column)")
    if len(answer) != len(completions):
        raise ValueError(f"{name} got {len(completions)} completions but {len(answer)} answers")
