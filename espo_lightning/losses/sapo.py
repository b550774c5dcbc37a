"""SAPO: Soft Adaptive Policy Optimization (Qwen team, arXiv 2511.20347): a smooth gate instead of a clip.

Per token, with ``r_t = exp(logp_t - old_logp_t)`` (log clamped to [-20, 20] as elsewhere):
``l_t = -f_tau(r_t) A_t`` with ``f_tau(r) = (4 / tau) * sigmoid(tau * (r - 1))``, ``tau = tau_pos``
where ``A > 0`` and ``tau_neg`` elsewhere (the paper's 1.0 and 1.05). Its gradient is
``dl_t/dlogp_t = -A_t * g_t * r_t`` with the *gate weight* ``g_t = 4 s (1 - s)``,
``s = sigmoid(tau (r_t - 1))``: exactly the unclipped policy gradient ``-A r`` at ``r = 1``
(``g = 1``), fading smoothly as ``r`` moves away, never exactly zero. The paper aggregates as GRPO
(sequence mean of token terms, then mean over responses), as TRL's ``loss_type="sapo"`` does.

"Clipped" for a soft gate (the ``clip/*`` metrics): a token whose gate has cut its gradient to less
than ``clip_threshold`` (default 1/2) of the unclipped policy gradient, on the side PPO would clip:
``r > 1`` with ``A > 0`` (high) or ``r < 1`` with ``A < 0`` (low). At tau = 1 that is ``r > 2.76``;
below 1 the gate weight never drops under 1/2 for tau < 1.76 (``r`` would have to be negative), so
``clip/low`` is 0 at the paper's temperatures. ``grad_util/token`` counts the tokens with ``A != 0``
that are not clipped in this sense; ``gate/weight_mean`` is the mean gate weight over the tokens with
``A != 0``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from espo_lightning.losses.aggregation import LossAggregation, check_aggregation, token_weights
from espo_lightning.losses.base import (
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    policy_metrics,
    token_log_ratio,
)
from espo_lightning.losses.kl import KLEstimator


def sapo_gate(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """``f_tau(r) = (4 / tau) * sigmoid(tau * (r - 1))``, elementwise (``tau`` broadcasts)."""
    return (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))


class SAPOLoss(PolicyLoss):
    """Soft Adaptive Policy Optimization with the paper's temperatures 1.0 (A > 0) and 1.05 (A <= 0)."""

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        loss_aggregation: LossAggregation = "seq_mean_token_mean",
        clip_threshold: float = 0.5,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            tau_pos: gate temperature of the tokens with A > 0; > 0. Larger is a narrower soft trust
                region (the gradient fades faster as the ratio leaves 1).
            tau_neg: gate temperature of the tokens with A <= 0; > 0 (the paper keeps it above
                tau_pos: negative updates are the less stable ones).
            loss_aggregation: "seq_mean_token_mean" (the paper's, GRPO's: mean over each response's
                tokens, then over responses) or "token_mean" (over all valid tokens of the minibatch).
            clip_threshold: a token counts as clipped in the ``clip/*`` metrics when its gate weight
                (its gradient over the unclipped policy gradient's) is below this; in (0, 1).
                Diagnostics only: the loss does not depend on it.
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range("SAPOLoss", "tau_pos", tau_pos, 0.0, low_open=True)
        check_range("SAPOLoss", "tau_neg", tau_neg, 0.0, low_open=True)
        check_range("SAPOLoss", "clip_threshold", clip_threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_aggregation("SAPOLoss", loss_aggregation)
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)
        self.loss_aggregation = loss_aggregation
        self.clip_threshold = float(clip_threshold)

    def forward(
        self,
        *,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        entropies: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        group_ids: Tensor | None = None,
        normalizer: Normalizer | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = canonical_inputs("SAPOLoss", logprobs, old_logprobs, advantages, mask)
        ratio = torch.exp(token_log_ratio(x.logp, x.old_logp))  # [B, T], value r_t, grad r_t dlogp
        tau = torch.where(x.adv > 0, x.adv.new_tensor(self.tau_pos), x.adv.new_tensor(self.tau_neg))  # [B, 1] or [B, T]
        weights = token_weights(x, normalizer, self.loss_aggregation)  # [B, T], 0 off-mask
        loss = (-sapo_gate(ratio, tau) * x.adv * weights).sum()

        with torch.no_grad():
            r = ratio.detach()
            s = torch.sigmoid(tau * (r - 1.0))
            gate_weight = 4.0 * s * (1.0 - s)  # [B, T] gradient relative to the unclipped -A r
            faded = gate_weight < self.clip_threshold
            clipped_low = faded & (r < 1) & (x.adv < 0) & x.mask
            clipped_high = faded & (r > 1) & (x.adv > 0) & x.mask
            signal = (x.adv != 0) & x.mask  # [B, T]
            active = signal & ~(clipped_low | clipped_high)
            metrics = policy_metrics(r * x.maskf, clipped_low, clipped_high, active, x.maskf)
            n_signal = signal.sum().clamp_min(1)
            metrics["gate/weight_mean"] = (gate_weight * signal).sum() / n_signal
        if self.needs_reference:
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, weights)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics
