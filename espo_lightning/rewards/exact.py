"""Exact string match, for tasks whose answer is a short literal (the embedded addition task: "82")."""
from __future__ import annotations

from typing import Any

from espo_lightning.rewards.math import completion_text

__all__ = ["exact_match"]


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
    if completions is None or answer is None:
        raise ValueError("exact_match needs completions= and answer= (the dataset's answer column)")
    if len(answer) != len(completions):
        raise ValueError(f"exact_match got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, gold in zip(completions, answer):
        first_line = completion_text(completion).strip().split("\n", 1)[0].strip()
        rewards.append(1.0 if first_line == str(gold).strip() else 0.0)
    return rewards
