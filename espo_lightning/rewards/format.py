"""Format rewards: does the completion state its final answer the way the task asks?"""
from __future__ import annotations

import re
from typing import Any

from espo_lightning.rewards.math import boxed_spans, completion_text, hash_answers, top_level_spans

__all__ = ["format_reward", "RegexFormatReward"]


def _answer_markers(text: str) -> int:
    """Number of final-answer markers: non-empty top-level ``\\boxed{}`` plus ``#### x`` lines."""
    boxes = sum(1 for start, end in top_level_spans(boxed_spans(text)) if text[start:end].strip())
    return boxes + len(hash_answers(text))


def format_reward(prompts: list[str] | None = None, completions: list[Any] | None = None,
                  **kwargs: Any) -> list[float]:
    """1.0 when a completion states exactly one final answer, as one non-empty ``\\boxed{...}`` or
    one ``#### x`` line (not both, not two boxes), else 0.0. A box nested in a box counts once;
    an unclosed box does not count.

    Args:
        prompts: the prompts (unused; part of the reward-function convention).
        completions: generated texts (or TRL conversational message lists).
        **kwargs: dataset columns (ignored).
    """
    del prompts, kwargs
    if completions is None:
        raise ValueError("format_reward needs completions=")
    return [1.0 if _answer_markers(completion_text(c)) == 1 else 0.0 for c in completions]


class RegexFormatReward:
    """Reward ``reward`` when the completion matches a regular expression, else 0.0.

    The pattern is applied with ``re.search`` and ``re.DOTALL`` (``.`` crosses newlines); anchor it
    with ``^`` and ``\\Z`` to require the whole completion to match. Example YAML::

        reward_funcs:
          - class_path: espo_lightning.rewards.format.RegexFormatReward
            init_args:
              pattern: '^<think>.*?</think>\\s*<answer>.*?</answer>\\s*\\Z'
              reward: 0.5

    Args:
        pattern: regular expression (Python ``re`` syntax) the completion must contain.
        reward: value returned for a matching completion; non-matching ones get 0.0.
    """

    def __init__(self, pattern: str, reward: float = 1.0) -> None:
        try:
            self._regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"RegexFormatReward: pattern {pattern!r} is not a valid regular expression: {err}") from None
        self.pattern = pattern
        self.reward = float(reward)
        self.__name__ = "regex_format"  # TRL-style reward naming reads __name__

    def __call__(self, prompts: list[str] | None = None, completions: list[Any] | None = None,
                 **kwargs: Any) -> list[float]:
        if completions is None:
            raise ValueError("RegexFormatReward needs completions=")
        return [self.reward if self._regex.search(completion_text(c)) else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"RegexFormatReward(pattern={self.pattern!r}, reward={self.reward})"
