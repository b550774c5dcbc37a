"""``GradientUtilizationMonitor``: how much of a minibatch actually pushes on the policy, and how hard."""
from __future__ import annotations

import math

import torch

from callbacks.base import DiagnosticsCallback, _scalar, step_batch, step_diagnostics, step_is_logged, write_metrics
from callbacks.layout import Chart
from espo_lightning.training.grad_norm import total_grad_norm  # noqa: F401 (re-exported: custom callbacks use it)


def nonzero_advantage_tokens(batch) -> torch.Tensor:
    """Valid tokens whose advantage is non-zero (``[B]`` or ``[B, Lc]`` advantages), a 0-d tensor."""
    mask = batch.completion_mask.bool()  # [B, Lc]
    adv = batch.advantages
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # [B, 1], broadcast over tokens
    return (mask & (adv != 0)).sum()


class GradientUtilizationMonitor(DiagnosticsCallback):
    """Gradient utilisation (DESIGN section 2) and the gradient norm.

    Per step and as ``..._epoch`` aggregates:

    - ``grad_util/token``: fraction of valid tokens whose policy gradient is active (A != 0 and not
      clipped); token-weighted.
    - ``grad_util/sequence``: fraction of responses with at least one active token; weighted by
      responses.
    - ``grad_util/nonzero_adv_frac``: fraction of valid tokens with A != 0, from the batch.
    - ``grad_util/effective``: of the tokens with A != 0, the share whose gradient survives the clip,
      ``grad_util/token / grad_util/nonzero_adv_frac`` = active tokens / non-zero-advantage tokens;
      aggregated as a ratio of sums (weighted by non-zero-advantage tokens) and left out of a step in
      which no token has A != 0.
    - ``grad/norm``: the global L2 norm of the policy's gradients *before* gradient clipping, measured
      in ``on_before_optimizer_step`` (Lightning clips after that hook); ``grad/norm_epoch`` is its
      mean over the epoch's optimizer steps and ``grad/norm_max_epoch`` its maximum. Non-finite norms
      are not logged; ``grad/nonfinite_frac_epoch`` is the fraction of optimizer steps that had one.

    Args:
        grad_norm: Measure the gradient norm (one reduction over all gradients per optimizer step).
        sync_step: See ``DiagnosticsCallback``.
        log_every_step: See ``DiagnosticsCallback``.
    """

    def __init__(self, grad_norm: bool = True, sync_step: bool = True, log_every_step: bool = True) -> None:
        super().__init__(sync_step=sync_step, log_every_step=log_every_step)
        self.grad_norm = grad_norm
        self._norms: list[torch.Tensor] = []  # this epoch's norms, folded into the aggregates when read

    def tensorboard_charts(self) -> list[Chart]:
        return [Chart("gradient utilization", "active tokens / responses with an active token",
                      (r"^grad_util/(token|sequence)$",))]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        diag = step_diagnostics(outputs)
        if "count/tokens" not in diag:
            return
        tokens = diag["count/tokens"]
        means = {}
        if "grad_util/token" in diag:
            means["grad_util/token"] = (diag["grad_util/token"], tokens)
        if "grad_util/sequence" in diag:
            means["grad_util/sequence"] = (diag["grad_util/sequence"], diag.get("count/sequences", tokens))
        b = step_batch(outputs, batch)
        if b is not None and "grad_util/token" in diag:
            nonzero = nonzero_advantage_tokens(b).to(tokens.dtype)
            active = diag["grad_util/token"] * tokens
            means["grad_util/nonzero_adv_frac"] = (nonzero / tokens.clamp_min(1), tokens)
            means["grad_util/effective"] = (active / nonzero.clamp_min(1), nonzero)
        self.record_step(pl_module, means)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grad_norm:
            return
        # PolicyModule computes it once per step and clips with the same number; other modules: here
        shared = getattr(pl_module, "gradient_norm", None)
        norm = shared() if callable(shared) else total_grad_norm(pl_module.parameters())
        if norm is None:
            return
        self._device = pl_module.device
        self._norms.append(norm)
        if self.log_every_step and step_is_logged(trainer):
            value = norm.item()  # identical on every rank (DDP all-reduced gradients, DTensor full_tensor)
            if math.isfinite(value):
                write_metrics(trainer, {"grad/norm": value})

    def _fold_pending(self, device) -> None:
        """The epoch's norms into ``grad/norm`` (finite ones), ``grad/nonfinite_frac`` and
        ``grad/norm_max``, with a few ops for the whole epoch, then the queued step values."""
        if self._norms:
            norms = torch.stack([_scalar(n, device) for n in self._norms])
            self._norms = []
            finite = torch.isfinite(norms)
            safe = torch.where(finite, norms, 0.0)
            for value, weight, nonfinite in zip(safe.unbind(0), finite.float().unbind(0), (~finite).float().unbind(0)):
                self._pending += [("grad/norm", value, weight), ("grad/nonfinite_frac", nonfinite, 1.0)]
            self._pending_max.append(("grad/norm_max", safe.max()))
        super()._fold_pending(device)

    def reset_epoch(self) -> None:
        super().reset_epoch()
        self._norms.clear()
