"""An example of a custom diagnostics callback, and how to write your own.

Writing one
-----------
1. Subclass ``callbacks.base.DiagnosticsCallback`` (or plain ``lightning.Callback``).
2. In ``on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)`` read the step only through
   ``step_diagnostics(outputs)`` (the loss's scalar metrics) and ``step_batch(outputs, batch)`` (the
   ``RolloutBatch`` trained on); ``trainer.datamodule.last_rollout`` holds the epoch's rollout stats.
3. Per-step values: ``self.log_step(pl_module, {name: (value, weight)})`` (weight = the tokens or
   responses the value averages over; reduced over ranks). Epoch aggregates:
   ``self.accumulate(pl_module, name, value, weight)``; the base class logs them as ``<name>_epoch``
   at the end of the epoch, synchronised across ranks. ``self.record_step(pl_module, means)`` does
   both at once. Anything computed across ranks must be computed
   on every rank (it is a collective); write to TensorBoard only through
   ``tensorboard_writers(trainer)`` (empty except on rank 0).
4. Optionally, ``tensorboard_charts()`` returns ``callbacks.layout.Chart``s: your metrics side by
   side in TensorBoard's Custom Scalars tab, beside the standard callbacks' charts.
5. Put the file in ``callbacks/`` and select it in YAML by its class path::

       trainer:
         callbacks:
           - class_path: callbacks.example_custom.AdvantageHistogram
             init_args:
               bins: 41

   A ``trainer.callbacks`` list in a later ``--config`` replaces the earlier list, so one small file
   swaps the default diagnostics for your own.
"""
from __future__ import annotations

import torch

from callbacks.base import DiagnosticsCallback, step_batch, tensorboard_writers
from callbacks.layout import Chart
from callbacks.metrics import HistogramSketch


class AdvantageHistogram(DiagnosticsCallback):
    """Distribution of the per-response advantages trained on.

    Logs ``advantage/abs_mean`` and ``advantage/nonzero_frac`` (over responses with at least one valid
    token) per step and as ``..._epoch``, and once per epoch a TensorBoard histogram
    ``advantage/histogram`` of the advantages over ``[-limit, limit]``.

    Args:
        bins: Histogram bins.
        limit: Half-width of the histogram range; advantages beyond it land in the outer bins.
    """

    def __init__(self, bins: int = 41, limit: float = 4.0) -> None:
        super().__init__()
        if bins < 1 or not limit > 0:
            raise ValueError(f"AdvantageHistogram: need bins >= 1 and limit > 0, got bins={bins}, limit={limit}")
        self.bins, self.limit = bins, limit
        self._hist: HistogramSketch | None = None

    def tensorboard_charts(self) -> list[Chart]:
        return [Chart("advantages", "mean |advantage| and non-zero fraction, per step",
                      (r"^advantage/(abs_mean|nonzero_frac)$",))]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        b = step_batch(outputs, batch)
        if b is None:
            return
        nonempty = b.completion_mask.bool().any(-1)  # [B]
        adv = b.advantages if b.advantages.dim() == 1 else b.advantages[:, 0]  # [B], constant per response
        adv = adv.detach().float()[nonempty]  # [n]
        n = torch.tensor(float(adv.numel()), device=adv.device)
        means = {"advantage/abs_mean": (adv.abs().sum() / n.clamp_min(1), n),
                 "advantage/nonzero_frac": ((adv != 0).sum() / n.clamp_min(1), n)}
        self.record_step(pl_module, means)
        if self._hist is None:
            # HistogramSketch bins [0, upper]; shifting by +limit maps [-limit, limit] onto it.
            self._hist = HistogramSketch(self.bins, 2 * self.limit).to(pl_module.device)
        self._hist.update(adv + self.limit)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._hist is None or not self._hist.update_called:
            return
        h = {k: v.cpu() for k, v in self._hist.compute().items()}  # collective: every rank
        self._hist.reset()
        num = int(h["num"].item())
        if num == 0:
            return
        shift = self.limit
        limits = [x - shift for x in self._hist.bucket_limits()]
        for writer in tensorboard_writers(trainer):
            writer.add_histogram_raw(
                "advantage/histogram", min=h["min"].item() - shift, max=h["max"].item() - shift, num=num,
                sum=h["sum"].item() - shift * num,
                sum_squares=h["sum_squares"].item() - 2 * shift * h["sum"].item() + shift * shift * num,
                bucket_limits=limits, bucket_counts=h["counts"].tolist(), global_step=trainer.global_step)
