"""Swappable diagnostics callbacks, selected in YAML by class path (``callbacks.ClipFractionMonitor``).

The standard set::

    trainer:
      callbacks:
        - callbacks.ClipFractionMonitor
        - callbacks.EntropyGroupMonitor
        - callbacks.GradientUtilizationMonitor
        - callbacks.RolloutMonitor

``callbacks/base.py`` documents how a callback reads a training step (``step_diagnostics``,
``step_batch``) and aggregates across steps and ranks; ``callbacks/layout.py`` how they lay out
TensorBoard's Custom Scalars tab (clip fractions, per-group clip fractions and clip ranges, reward
with accuracy, each on one chart); ``callbacks/example_custom.py`` shows how to
write your own."""
from callbacks.base import DiagnosticsCallback, step_batch, step_diagnostics, tensorboard_writers
from callbacks.clip import ClipFractionMonitor
from callbacks.entropy import EntropyGroupMonitor
from callbacks.example_custom import AdvantageHistogram
from callbacks.grad_util import GradientUtilizationMonitor
from callbacks.layout import Chart, TensorBoardLayout
from callbacks.rollout import RolloutMonitor

STANDARD = (ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor, RolloutMonitor)

__all__ = [
    "AdvantageHistogram",
    "Chart",
    "ClipFractionMonitor",
    "DiagnosticsCallback",
    "EntropyGroupMonitor",
    "GradientUtilizationMonitor",
    "RolloutMonitor",
    "STANDARD",
    "TensorBoardLayout",
    "step_batch",
    "step_diagnostics",
    "tensorboard_writers",
]
