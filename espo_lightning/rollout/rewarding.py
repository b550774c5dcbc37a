"""Scoring completions with a weighted list of TRL-style reward functions.

``Rewarder`` is what the DataModule uses: the weighted total, the accuracy reward's verdicts and
the timeouts of one batch, scored in this process or in a pool of worker processes with a
per-completion time limit (``reward_pool``). ``score_completions`` / ``combined_rewards`` are the
in-process steps.

A reward function that raises, returns the wrong number of values, or returns something that is not
a number or None stops the run with a ``RewardError`` naming the function by import path and the
completion. A NaN (or infinity) from one function means that function could not score that
completion: it counts as that function's None, and the other functions' scores stand."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from espo_lightning.errors import ConfigError, RewardError
from espo_lightning.rollout.reward_pool import RewardPool, Task


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


@dataclass
class Rewards:
    """The rewards of one batch of completions."""

    total: list[float | None]  # weighted sum; None where no function could score
    correct: list[float]  # 1.0 where the accuracy reward says correct
    timed_out: list[bool]  # a function hit data.reward_timeout_s on this completion


class Rewarder:
    """Scores completions with the DataModule's reward functions, in this process or in a pool of
    worker processes with a per-completion time limit (``reward_pool.RewardPool``).

    Args:
        funcs: Reward functions (TRL convention).
        weights: One weight per function.
        accuracy: The function whose 1.0 means "correct" (reused when it is one of ``funcs``).
        workers: Worker processes; 0 scores in this process.
        timeout_s: Per-completion wall-clock limit in the workers (None: none).
    """

    def __init__(self, funcs: list[Callable], weights: list[float] | None = None, accuracy: Callable | None = None,
                 workers: int = 0, timeout_s: float | None = None):
        # The settings are the DataModule's; errors name them by its config keys.
        if not funcs:
            raise ConfigError("data.reward_funcs: give at least one reward function")
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"data.reward_weights: {len(weights)} weights for {len(funcs)} reward functions; "
                              "give one weight per function")
        if workers < 0:
            raise ConfigError(f"data.reward_workers must be >= 0, got {workers!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"data.reward_timeout_s must be > 0 (or null), got {timeout_s!r}")
        if timeout_s is not None and workers == 0:
            raise ConfigError("data.reward_timeout_s needs data.reward_workers >= 1: a call in the trainer's own "
                              "process cannot be stopped safely")
        self.funcs = list(funcs)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        self.accuracy = accuracy or self.funcs[0]
        self.workers, self.timeout_s = workers, timeout_s
        self._pool = None

    def all_funcs(self) -> list[Callable]:
        """The reward functions, and the accuracy reward when it is not one of them."""
        return self.funcs + ([] if any(f is self.accuracy for f in self.funcs) else [self.accuracy])

    def _per_func(self, funcs, prompts, completions, columns) -> tuple[list[list[float | None]], list[bool]]:
        if self.workers == 0:
            return score_completions(funcs, prompts, completions, columns), [False] * len(completions)
        if self._pool is None:
            all_funcs = self.all_funcs()
            self._pool = RewardPool(all_funcs, [reward_name(f) for f in all_funcs], self.workers, self.timeout_s)
        slots = [next(k for k, g in enumerate(self.all_funcs()) if g is f) for f in funcs]
        tasks = [Task(func=k, index=i) for i in range(len(completions)) for k in slots]
        outcomes = self._pool.run(tasks, prompts, completions, columns)
        per_func = [[None] * len(completions) for _ in funcs]
        timed_out = [False] * len(completions)
        for task, outcome in outcomes.items():
            j, func = slots.index(task.func), funcs[slots.index(task.func)]
            if outcome.kind == "timeout":
                timed_out[task.index] = True
            elif outcome.kind == "error":
                raise RewardError(f"reward function {reward_name(func)} raised on completion {task.index} "
                                  f"({outcome.message})")
            elif len(outcome.values) != 1:
                raise RewardError(f"reward function {reward_name(func)} returned {len(outcome.values)} values for "
                                  "1 completion")
            else:
                per_func[j][task.index] = _as_reward(func, outcome.values[0], task.index)
        return per_func, timed_out

    def score(self, prompts: list, completions: list, columns: dict[str, list]) -> Rewards:
        funcs = self.all_funcs()
        per_func, timed_out = self._per_func(funcs, prompts, completions, columns)
        total = combined_rewards(self.funcs, self.weights, prompts, completions, columns, per_func[: len(self.funcs)])
        accuracy = per_func[next(k for k, f in enumerate(funcs) if f is self.accuracy)]
        return Rewards(total=total, correct=_correct(accuracy), timed_out=timed_out)

    def correct(self, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
        """Only the accuracy reward's verdicts (validation)."""
        return _correct(self._per_func([self.accuracy], prompts, completions, columns)[0][0])

    def check_source(self, key: str, source) -> None:
        """Load a prompt source (``key``: its config key) and let the reward functions that can check
        their columns up front (``check_rows``) do so; a failure is a ``ConfigError`` naming the key."""
        try:
            rows = source.rows()
        except (ValueError, FileNotFoundError, ImportError) as err:
            raise ConfigError(f"{key}: {err}") from err
        if not rows:
            raise ConfigError(f"{key}: the prompt source returned no rows")
        where = getattr(source, "where", None) or getattr(source, "path", None) or type(source).__name__
        for func in self.all_funcs():
            check = getattr(func, "check_rows", None)
            if check is not None:
                try:
                    check(rows)
                except ValueError as err:
                    raise ConfigError(f"{key}: {where}: {err}") from err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _correct(values: list[float | None]) -> list[float]:
    return [1.0 if v is not None and v >= 1.0 - 1e-6 else 0.0 for v in values]
