"""``ClipFractionMonitor``: how many tokens the clip switched off, per step and per epoch."""
from __future__ import annotations

import torch

from callbacks.base import DiagnosticsCallback, step_diagnostics
from callbacks.layout import Chart

TOKEN_KEYS = ("clip/low", "clip/high", "clip/total")
# What the entropy-aware baselines report in place of (or beside) a hard clip, token-weighted:
# Clip-Cov / KL-Cov's covariance-selected fraction, the high-entropy mask's kept fraction, SAPO's
# mean gate weight (docs/metrics.md).
METHOD_KEYS = ("cov/selected", "entropy_mask/kept", "gate/weight_mean")


class ClipFractionMonitor(DiagnosticsCallback):
    """Logs the loss's clip fractions (DESIGN section 2): a token is clipped low if its ratio is below
    ``1 - eps`` with A < 0, clipped high if above ``1 + eps`` with A > 0.

    Per optimizer step (global over ranks, see ``DiagnosticsCallback``): ``clip/low``, ``clip/high``,
    ``clip/total`` (fractions of the step's valid tokens) and, when the loss reports it (sequence-level
    losses), ``clip/sequence`` (fraction of responses). Per epoch: the same names with ``_epoch``
    appended (``clip/low_epoch``, ...), token-weighted (sequence-weighted for ``clip/sequence``) over
    every step of the epoch on every rank. Also the importance ratios the clip acts on:
    ``ratio/mean`` (token-weighted) and ``ratio/max`` (largest over ranks), per step and per epoch;
    and, when the loss reports them, ``cov/selected`` (Clip-Cov, KL-Cov), ``entropy_mask/kept`` (the
    high-entropy token mask) and ``gate/weight_mean`` (SAPO), token-weighted.
    """

    def tensorboard_charts(self) -> list[Chart]:
        return [Chart("clipping", "clip fraction low / high / total, per step", (r"^clip/(low|high|total)$",)),
                Chart("clipping", "clip fraction low / high / total, per epoch", (r"^clip/(low|high|total)_epoch$",))]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        diag = step_diagnostics(outputs)
        if "count/tokens" not in diag:
            return
        tokens, sequences = diag["count/tokens"], diag.get("count/sequences", diag["count/tokens"])
        means = {k: (diag[k], tokens) for k in TOKEN_KEYS + METHOD_KEYS if k in diag}
        if "clip/sequence" in diag:
            means["clip/sequence"] = (diag["clip/sequence"], sequences)
        if "ratio/mean" in diag:
            means["ratio/mean"] = (diag["ratio/mean"], tokens)
        maxes = {}
        if "ratio/max" in diag:  # -inf (never logged) for a step without tokens
            maxes["ratio/max"] = torch.where(tokens > 0, diag["ratio/max"], float("-inf"))
        self.record_step(pl_module, means, maxes)
