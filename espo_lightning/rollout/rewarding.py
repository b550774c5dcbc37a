"""Scoring completions with a weighted list of TRL-style reward functions."""
from __future__ import annotations

import math
from typing import Callable

from espo_lightning.errors import ConfigError


def reward_name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)


def score_completions(funcs: list[Callable], prompts: list[str], completions: list[str],
                      columns: dict[str, list]) -> list[list[float | None]]:
    """Each function's rewards, one list per function (checked for length)."""
    per_func = []
    for func in funcs:
        values = func(prompts=prompts, completions=completions, **columns)
        if len(values) != len(completions):
            raise ConfigError(f"reward function {reward_name(func)} returned {len(values)} values for "
                              f"{len(completions)} completions")
        per_func.append(list(values))
    return per_func


def combined_rewards(funcs: list[Callable], weights: list[float], prompts: list[str], completions: list[str],
                     columns: dict[str, list], per_func: list[list[float | None]] | None = None) -> list[float | None]:
    """Weighted sum of the functions' rewards. A function's ``None`` (could not score) counts as 0
    while another function scored the completion; a completion no function could score is ``None``,
    so its advantage is 0 (DESIGN.md eq. 11)."""
    if per_func is None:
        per_func = score_completions(funcs, prompts, completions, columns)
    out: list[float | None] = []
    for i in range(len(completions)):
        scored = [(w, v[i]) for w, v in zip(weights, per_func) if v[i] is not None]
        total = sum(w * float(x) for w, x in scored)
        out.append(None if not scored or not math.isfinite(total) else total)
    return out
