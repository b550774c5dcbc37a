"""A run's TensorBoard scalars as curves over rollouts, and their spread over seeds.

The x axis is rollouts completed (an epoch is one rollout). Per-rollout values are the ``<tag>_epoch``
aggregates where a tag is logged per step (``clip/total``), else the tag itself (``reward/mean`` is
logged once per rollout). Validation is logged before the first update (rollout 0) and every few
rollouts. Everything is read from the run folders alone, so a report can be redone at any time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from espo_lightning.plots import find_event_dir


@dataclass
class Curve:
    x: np.ndarray  # rollouts completed
    y: np.ndarray
    wall: np.ndarray  # seconds since the run's first logged value


@dataclass
class RunCurves:
    method: str
    seed: int
    tags: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # tag -> (steps, values, wall times)
    steps_per_rollout: int

    def series(self, tag: str) -> Curve | None:
        """``tag`` per rollout (its ``_epoch`` aggregate when it is logged per step), or None."""
        for name in (tag + "_epoch", tag):
            if name in self.tags and len(self.tags[name][0]):
                steps, values, walls = self.tags[name]
                return Curve(self._rollouts(steps, name.startswith("val/")), values,
                             walls - self.start)
        return None

    @property
    def start(self) -> float:
        return min(float(w[0]) for _, _, w in self.tags.values() if len(w))

    def _rollouts(self, steps: np.ndarray, validation: bool) -> np.ndarray:
        # Per-rollout aggregates are logged at the rollout's last step; a validation after rollout r
        # at the same step, and the one before the first update at step 0.
        done = np.rint((steps + 1) / self.steps_per_rollout)
        if validation and steps[0] == 0:
            done[0] = 0
        return done


def load_run(folder: Path, method: str, seed: int) -> RunCurves:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(find_event_dir(folder)), size_guidance={"scalars": 0})
    acc.Reload()
    tags = {}
    for tag in acc.Tags().get("scalars", []):
        last = {e.step: (e.value, e.wall_time) for e in acc.Scalars(tag)}  # a step logged twice: the last wins
        steps = np.array(sorted(last), dtype=np.int64)
        tags[tag] = (steps, np.array([last[s][0] for s in steps]), np.array([last[s][1] for s in steps]))
    per_rollout = tags.get("reward/mean")
    if per_rollout is None or not len(per_rollout[0]):
        raise ValueError(f"{folder}: no reward/mean scalar; was RolloutMonitor among the run's callbacks?")
    return RunCurves(method, seed, tags, steps_per_rollout=int(per_rollout[0][0]) + 1)


@dataclass
class Band:
    """A tag over seeds on the rollouts every seed has: mean, min and max."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def band(runs: list[RunCurves], tag: str) -> Band | None:
    curves = [c for c in (r.series(tag) for r in runs) if c is not None]
    if not curves:
        return None
    x = curves[0].x
    for c in curves[1:]:
        x = np.intersect1d(x, c.x)
    if not len(x):
        return None
    ys = np.stack([c.y[np.searchsorted(c.x, x)] for c in curves])
    return Band(x, ys.mean(0), ys.min(0), ys.max(0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties get their average rank); nan for fewer than 3 points or a constant input."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        same = v == value
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return ranks


def time_to_target(run: RunCurves, target: float) -> tuple[float | None, float | None]:
    """(seconds, rollouts) from the first validation to the first with ``val/accuracy >= target``."""
    val = run.series("val/accuracy")
    if val is None:
        return None, None
    hit = np.nonzero(val.y >= target)[0]
    if not len(hit):
        return None, None
    return float(val.wall[hit[0]] - val.wall[0]), float(val.x[hit[0]])
