"""The diagnostics callbacks' queued epoch aggregates and the one-event TensorBoard write.

Steps only queue their values; the queue is folded in when the epoch is read. The fold must give the
numbers adding the values step by step gives, bit for bit, also when the epoch is read half way;
non-finite gradient norms are counted, not averaged. ``write_metrics`` writes a call's values as one
TensorBoard event that TensorBoard reads back value by value, under the logger's prefix."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from callbacks.base import DiagnosticsCallback
from callbacks.grad_util import GradientUtilizationMonitor

# a module whose trainer does not log this step (what record_step reads)
MODULE = SimpleNamespace(device=torch.device("cpu"),
                         trainer=SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False)))


def sequential(pairs):
    """(sum of v * w, sum of w) in float32, added one pair after the other (the reference)."""
    total = None
    for v, w in pairs:
        row = torch.stack([torch.tensor(v, dtype=torch.float32) * torch.tensor(w, dtype=torch.float32),
                           torch.tensor(w, dtype=torch.float32)])
        total = row if total is None else total + row
    return total


def test_weighted_means_by_hand_and_maxima():
    cb = DiagnosticsCallback()
    cb.record_step(MODULE, {"a": (torch.tensor(0.5), torch.tensor(10.0)), "b": (torch.tensor(2.0), 1.0)},
                   {"m": torch.tensor(3.0)})
    cb.record_step(MODULE, {"a": (torch.tensor(0.0), torch.tensor(30.0))}, {"m": torch.tensor(-1.0)})
    cb.accumulate(MODULE, "b", torch.tensor(4.0), 3.0)
    # a: (0.5 * 10 + 0 * 30) / 40 = 0.125; b: (2 * 1 + 4 * 3) / 4 = 3.5; m: max(3, -1) = 3
    assert cb.compute_epoch() == {"a": 0.125, "b": 3.5, "m": 3.0}
    cb.reset_epoch()
    assert cb.compute_epoch() == {}


def test_fold_is_the_step_by_step_sum_bit_for_bit_also_when_read_half_way():
    gen = torch.Generator().manual_seed(0)
    steps = [{f"n{k}": (torch.rand((), generator=gen) * 3, torch.randint(1, 500, (), generator=gen).float())
              for k in range(3) if (k + s) % 4} for s in range(9)]  # names come and go between steps
    whole, halves = DiagnosticsCallback(), DiagnosticsCallback()
    for s, means in enumerate(steps):
        whole.accumulate_many(MODULE, means)
        halves.accumulate_many(MODULE, means)
        if s == 4:
            halves.compute_epoch()  # folds the first five steps; the rest are added after them
    for cb in (whole, halves):
        cb._fold_pending(MODULE.device)
        for name in ("n0", "n1", "n2"):
            reference = sequential([(float(m[name][0]), float(m[name][1])) for m in steps if name in m])
            assert torch.equal(cb._sums[name], reference), name


def test_gradient_norms_non_finite_counted_not_averaged():
    cb = GradientUtilizationMonitor()
    norms = iter([torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(3.0), torch.tensor(float("nan"))])
    module = SimpleNamespace(device=torch.device("cpu"), gradient_norm=lambda: next(norms))
    trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False))
    for _ in range(4):
        cb.on_before_optimizer_step(trainer, module, None)
    out = cb.compute_epoch()
    # finite norms 1 and 3: mean 2, max 3; 2 of 4 steps non-finite
    assert out == {"grad/norm": 2.0, "grad/nonfinite_frac": 0.5, "grad/norm_max": 3.0}


def test_write_metrics_is_one_tensorboard_event_read_back_per_value(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from espo_lightning.training.log_writer import write_metrics

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="run")
    trainer = SimpleNamespace(callback_metrics={}, loggers=[logger], is_global_zero=True,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=7)))
    write_metrics(trainer, {"clip/low": 0.25, "grad/norm": 1.5})
    write_metrics(trainer, {"clip/low_epoch": 0.125}, epoch_level=True)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("run-clip/low")] == [(7, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("run-grad/norm")] == [(7, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("run-clip/low_epoch")] == [(6, 0.125)]
    assert trainer.callback_metrics["grad/norm"].item() == 1.5
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = [e for f in (tmp_path / "tb" / "version_0").glob("events.*")
              for e in EventFileLoader(str(f)).Load() if e.HasField("summary")]
    assert [len(e.summary.value) for e in events] == [2, 1]  # one event per call
    assert math.isclose(events[0].wall_time, events[1].wall_time, abs_tol=60)
