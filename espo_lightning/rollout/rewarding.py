"""Scoring completions with a weighted list of TRL-style reward functions.

A reward function that raises, returns the wrong number of values, or returns something that is not
a number or None stops the run with a ``RewardError`` naming the function by import path and the
completion. A NaN (or infinity) from one function means that function could not score that
completion: it counts as that function's None, and the other functions' scores stand."""
from __future__ import annotations

import math
import numbers
from typing import Callable

from espo_lightning.errors import RewardError


def reward_name(func) -> str:
    """The function's import path (``espo_lightning.rewards.math_accuracy``), as configs name it."""
    target = func if hasattr(func, "__qualname__") else type(func)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(func).__name__
    return f"{module}.{name}" if module and module != "builtins" else name


def _call(func, prompts, completions, columns, offset: int = 0) -> list:
    try:
        return list(func(prompts=prompts, completions=completions, **columns))
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported with its function
        where = _first_failing(func, prompts, completions, columns) if len(completions) > 1 else 0
        raise RewardError(f"reward function {reward_name(func)} raised on completion {offset + where} "
                          f"({type(err).__name__}: {err})") from err


def _first_failing(func, prompts, completions, columns) -> int:
    """The first completion the function raises on when called on it alone (0 when none does: then
    it failed on the batch as a whole)."""
    for i in range(len(completions)):
        try:
            func(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                 **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001
            return i
    return 0


def _as_reward(func, value, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward function {reward_name(func)} returned {value!r} ({type(value).__name__}) for "
                          f"completion {index}: rewards must be numbers or None")
    value = float(value)
    return value if math.isfinite(value) else None


def score_completions(funcs: list[Callable], prompts: list[str], completions: list,
                      columns: dict[str, list]) -> list[list[float | None]]:
    """Each function's rewards, one list per function: checked for length and type, non-finite
    values as None."""
    per_func = []
    for func in funcs:
        values = _call(func, prompts, completions, columns)
        if len(values) != len(completions):
            raise RewardError(f"reward function {reward_name(func)} returned {len(values)} values for "
                              f"{len(completions)} completions")
        per_func.append([_as_reward(func, v, i) for i, v in enumerate(values)])
    return per_func


def combined_rewards(funcs: list[Callable], weights: list[float], prompts: list[str], completions: list,
                     columns: dict[str, list], per_func: list[list[float | None]] | None = None) -> list[float | None]:
    """Weighted sum of the functions' rewards. A function's ``None`` (could not score) counts as 0
    while another function scored the completion; a completion no function could score is ``None``,
    so its advantage is 0 (DESIGN.md eq. 11)."""
    if per_func is None:
        per_func = score_completions(funcs, prompts, completions, columns)
    out: list[float | None] = []
    for i in range(len(completions)):
        scored = [(w, v[i]) for w, v in zip(weights, per_func) if v[i] is not None and math.isfinite(v[i])]
        total = sum(w * float(x) for w, x in scored)
        out.append(None if not scored or not math.isfinite(total) else total)
    return out
