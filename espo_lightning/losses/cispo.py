"""CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance-sampling *weight*, not the update.

``loss = -sum_t sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * logp_t / (valid tokens)``, a
REINFORCE-style term weighted by a truncated, detached ratio ``r_t = exp(logp_t - old_logp_t)``.
Unlike PPO-style clipping, a truncated token keeps its gradient (with a bounded coefficient), so every
token with ``A != 0`` contributes.

Defaults: MiniMax-M1 does not bound the weight from below ("set eps_low to a large value"); ScaleRL
(Khatri et al. 2025, arXiv 2510.13786), which adopts CISPO in its recipe, truncates the weight at
``eps_max = 4``, i.e. ``sg(min(r, 4))``, the same cap Thinking Machines' Tinker uses by default. We
therefore default to ``epsilon_low = 1.0`` (lower bound 0: no lower truncation, ratios are >= 0) and
``epsilon_high = 3.0`` (weight capped at 1 + 3 = 4).
"""
from __future__ import annotations

import torch
from torch import Tensor

from espo_lightning.losses.base import (
    MAX_LOG_RATIO,
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    denominators,
    policy_metrics,
)
from espo_lightning.losses.kl import KLEstimator


class CISPOLoss(PolicyLoss):
    """Clipped IS-weight Policy Optimization with a token-level mean over the minibatch."""

    def __init__(
        self,
        epsilon_low: float = 1.0,
        epsilon_high: float = 3.0,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            epsilon_low: the IS weight is truncated below at 1 - epsilon_low; in [0, 1]. The default
                1.0 (bound 0) means no lower truncation, as in MiniMax-M1.
            epsilon_high: the IS weight is truncated above at 1 + epsilon_high; >= 0. The default 3.0
                caps the weight at 4, ScaleRL's eps_max.
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range("CISPOLoss", "epsilon_low", epsilon_low, 0.0, 1.0)
        check_range("CISPOLoss", "epsilon_high", epsilon_high, 0.0)
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)

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
        x = canonical_inputs("CISPOLoss", logprobs, old_logprobs, advantages, mask)
        low, high = 1.0 - self.epsilon_low, 1.0 + self.epsilon_high
        with torch.no_grad():
            ratio = torch.exp((x.logp.detach() - x.old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
            _, n_tokens = denominators(x, normalizer)
            weight = x.maskf / n_tokens  # [B, T] token mean over the minibatch
            coef = -ratio.clamp(low, high) * x.adv * weight  # [B, T] sg(clip(r)) * A, negated, weighted
        loss = (coef * x.logp).sum()

        with torch.no_grad():
            below, above = ratio < low, ratio > high  # [B, T] truncated, whatever the sign of A
            clipped_low = below & (x.adv < 0)
            clipped_high = above & (x.adv > 0)
            # Truncation bounds a detached weight and never zeroes a gradient: active is just A != 0.
            active = (x.adv != 0).expand_as(ratio)
            metrics = policy_metrics(ratio * x.maskf, clipped_low, clipped_high, active, x.maskf)
            metrics["clip/truncated"] = ((below | above) * x.maskf).sum() / x.maskf.sum().clamp_min(1)
        if self.needs_reference:
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, weight)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics
