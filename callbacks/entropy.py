"""``EntropyGroupMonitor``: the old policy's token entropies and ESPO's per-entropy-group statistics."""
from __future__ import annotations

import math

from callbacks.base import DiagnosticsCallback, entropy_group_indices, step_batch, step_diagnostics, tensorboard_writers
from callbacks.layout import Chart
from callbacks.metrics import HistogramSketch

GROUP_FIELDS = ("entropy_mean", "epsilon_mean", "clip_frac", "ratio_mean")


class EntropyGroupMonitor(DiagnosticsCallback):
    """Entropy diagnostics.

    - ``entropy/mean``: mean entropy (nats) of the old policy over the step's valid tokens, from the
      batch's ``entropies`` and ``completion_mask``; ``entropy/mean_epoch`` token-weighted over the epoch.
    - ``entropy/histogram``: a TensorBoard histogram of the epoch's valid-token entropies (every rank's
      tokens, each token counted once per pass over the rollout), written once per epoch when a
      ``TensorBoardLogger`` is attached.
    - Per entropy group k (0 = highest entropy; only for losses that report groups, i.e. ESPO):
      ``entropy_group/<k>/size_frac`` (weighted by the step's tokens), ``/entropy_mean``,
      ``/epsilon_mean``, ``/clip_frac``, ``/ratio_mean`` (weighted by group k's token count,
      ``size_frac * count/tokens``), per step and as ``..._epoch``.

    Args:
        histogram: Write the entropy histogram.
        histogram_bins: Number of equal-width bins over ``[0, histogram_max]``.
        histogram_max: Upper edge in nats; default ``log(V)`` (the largest possible entropy) from the
            module's ``policy.config.vocab_size`` or ``loss_fn.vocab_size``, else 10.
        sync_step: See ``DiagnosticsCallback``.
        log_every_step: See ``DiagnosticsCallback``.
    """

    def __init__(self, histogram: bool = True, histogram_bins: int = 64, histogram_max: float | None = None,
                 sync_step: bool = True, log_every_step: bool = True) -> None:
        super().__init__(sync_step=sync_step, log_every_step=log_every_step)
        if histogram_bins < 1:
            raise ValueError(f"EntropyGroupMonitor: histogram_bins must be >= 1, got {histogram_bins}")
        if histogram_max is not None and not histogram_max > 0:
            raise ValueError(f"EntropyGroupMonitor: histogram_max must be > 0, got {histogram_max}")
        self.histogram, self.histogram_bins, self.histogram_max = histogram, histogram_bins, histogram_max
        self._hist: HistogramSketch | None = None

    def _histogram_upper(self, pl_module) -> float:
        if self.histogram_max is not None:
            return self.histogram_max
        for owner, attr in (("policy", "config"), ("loss_fn", None)):
            obj = getattr(pl_module, owner, None)
            obj = getattr(obj, attr, None) if attr else obj
            vocab = getattr(obj, "vocab_size", None)
            if isinstance(vocab, int) and vocab > 1:
                return math.log(vocab)
        return 10.0

    def tensorboard_charts(self) -> list[Chart]:
        return [Chart("clipping", "clip fraction per entropy group (0 = highest entropy)",
                      (r"^entropy_group/\d+/clip_frac$",)),
                Chart("clipping", "clip range (epsilon) per entropy group", (r"^entropy_group/\d+/epsilon_mean$",))]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        diag = step_diagnostics(outputs)
        b = step_batch(outputs, batch)
        means = {}
        if b is not None and b.entropies is not None:
            mask = b.completion_mask.bool()  # [B, Lc]
            n = mask.sum()
            ent = b.entropies.detach().float().masked_fill(~mask, 0.0)  # [B, Lc]
            means["entropy/mean"] = (ent.sum() / n.clamp_min(1), n)
            if self.histogram:
                if self._hist is None:
                    self._hist = HistogramSketch(self.histogram_bins, self._histogram_upper(pl_module))
                if self._hist.device != pl_module.device:
                    self._hist.to(pl_module.device)
                self._hist.update(b.entropies.detach()[mask])
        tokens = diag.get("count/tokens")
        if tokens is not None:
            for k in entropy_group_indices(diag):
                prefix = f"entropy_group/{k}/"
                size = diag.get(prefix + "size_frac")
                if size is None:
                    continue
                means[prefix + "size_frac"] = (size, tokens)
                group_tokens = size * tokens
                for field in GROUP_FIELDS:
                    if prefix + field in diag:
                        means[prefix + field] = (diag[prefix + field], group_tokens)
        self.record_step(pl_module, means)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._hist is not None:
            self._hist.reset()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._hist is None or not self._hist.update_called:
            return
        stats = {k: v.cpu() for k, v in self._hist.compute().items()}  # collective: every rank
        self._hist.reset()
        if stats["num"].item() == 0:
            return
        for writer in tensorboard_writers(trainer):
            writer.add_histogram_raw(
                "entropy/histogram", min=stats["min"].item(), max=stats["max"].item(), num=int(stats["num"].item()),
                sum=stats["sum"].item(), sum_squares=stats["sum_squares"].item(),
                bucket_limits=self._hist.bucket_limits(), bucket_counts=stats["counts"].tolist(),
                global_step=trainer.global_step)
