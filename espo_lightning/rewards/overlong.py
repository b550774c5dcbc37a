"""DAPO's soft overlong punishment (Yu et al., 2025, eq. 13) as a reward function.

A completion of L tokens with a budget of ``max_completion_length`` (L_max) and a buffer of
``buffer_length`` (L_cache) gets
``0`` for L <= L_max - L_cache, ``((L_max - L_cache) - L) / L_cache * penalty`` inside the buffer
(falling linearly from 0 to -penalty), and ``-penalty`` beyond L_max. Add it next to the accuracy
reward in ``data.reward_funcs``; it reads the token count from ``completion_ids`` (passed to every
reward function, as TRL does)."""
from __future__ import annotations

from typing import Any

__all__ = ["OverlongPenalty"]


class OverlongPenalty:
    """Soft length penalty over a buffer before the completion budget (DAPO).

    Args:
        max_completion_length: L_max, the completion budget in tokens (usually ``data.max_new_tokens``); >= 1.
        buffer_length: L_cache, the tokens before L_max over which the penalty ramps up; in [1, L_max].
        penalty: the penalty at and beyond L_max (1.0 in DAPO); >= 0.
    """

    def __init__(self, max_completion_length: int, buffer_length: int, penalty: float = 1.0) -> None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1:
            raise ValueError(f"OverlongPenalty: max_completion_length must be an integer >= 1, got {max_completion_length!r}")
        if isinstance(buffer_length, bool) or not isinstance(buffer_length, int) or not 1 <= buffer_length <= max_completion_length:
            raise ValueError(f"OverlongPenalty: buffer_length must be an integer in [1, max_completion_length="
                             f"{max_completion_length}], got {buffer_length!r}")
        if not penalty >= 0:
            raise ValueError(f"OverlongPenalty: penalty must be >= 0, got {penalty!r}")
        self.max_completion_length, self.buffer_length, self.penalty = max_completion_length, buffer_length, float(penalty)
        self.__name__ = "overlong_penalty"

    def __call__(self, prompts: list[str] | None = None, completions: list[Any] | None = None,
                 completion_ids: list[list[int]] | None = None, **kwargs: Any) -> list[float]:
        if completion_ids is None:
            raise ValueError("OverlongPenalty needs completion_ids= (the sampled token ids of each completion)")
        start = self.max_completion_length - self.buffer_length
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                rewards.append(0.0)
            elif length <= self.max_completion_length:
                rewards.append((start - length) / self.buffer_length * self.penalty)
            else:
                rewards.append(-self.penalty)
        return rewards

    def __repr__(self) -> str:
        return (f"OverlongPenalty(max_completion_length={self.max_completion_length}, "
                f"buffer_length={self.buffer_length}, penalty={self.penalty})")
