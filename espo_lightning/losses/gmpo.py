"""GMPO: Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673).

GRPO maximises the arithmetic mean of the token terms ``r_t A``; GMPO maximises their geometric
mean, which outliers move far less. Per response i with advantage ``A_i`` the objective is
``A_i * exp(mean_t c_t)`` with token-level clipping in log space,
``c_t = min(log r_t, clip(log r_t, -eps_low, eps_high))`` if ``A_i > 0`` else ``max(...)``, i.e. the
ratio range ``[exp(-eps_low), exp(eps_high)]`` (the paper's default eps 0.4 / 0.4). The loss is minus
the mean of the objective over the responses with at least one valid token.

``log r_t = sg(clamp(logp - old, -20, 20)) + logp - sg(logp)``: the value is the clamped log-ratio,
the gradient is that of ``logp`` (finite even at log-ratios of +-50).
"""
from __future__ import annotations

import torch
from torch import Tensor

from espo_lightning.losses.base import (
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    denominators,
    policy_metrics,
    token_log_ratio,
)
from espo_lightning.losses.kl import KLEstimator


class GMPOLoss(PolicyLoss):
    """Geometric-Mean Policy Optimization (sequence-level objective, token-level log-space clip)."""

    def __init__(
        self,
        epsilon_low: float = 0.4,
        epsilon_high: float = 0.4,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            epsilon_low: log-space lower clip, the token ratio is clipped at exp(-epsilon_low); >= 0.
            epsilon_high: log-space upper clip, the token ratio is clipped at exp(epsilon_high); >= 0.
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range("GMPOLoss", "epsilon_low", epsilon_low, 0.0)
        check_range("GMPOLoss", "epsilon_high", epsilon_high, 0.0)
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
        x = canonical_inputs("GMPOLoss", logprobs, old_logprobs, advantages, mask)
        dtype = x.logp.dtype
        n = x.maskf.sum(-1, keepdim=True)  # [B, 1]
        nonempty = n > 0  # [B, 1]
        n_seqs, _ = denominators(x, normalizer)
        # The objective is per response; a [B, T] advantage is reduced to its mean over valid tokens
        # (exact for the usual advantage broadcast to every token of a response).
        adv = x.adv if x.adv.shape[-1] == 1 else (x.adv * x.maskf).sum(-1, keepdim=True) / n.clamp_min(1)  # [B, 1]

        log_ratio = token_log_ratio(x.logp, x.old_logp)  # [B, T], 0 off-mask
        clipped_log_ratio = log_ratio.clamp(-self.epsilon_low, self.epsilon_high)
        positive = adv > 0  # [B, 1]
        c = torch.where(
            positive, torch.minimum(log_ratio, clipped_log_ratio), torch.maximum(log_ratio, clipped_log_ratio)
        )  # [B, T]
        mean_c = (c * x.maskf).sum(-1, keepdim=True) / n.clamp_min(1)  # [B, 1]
        objective = adv * torch.exp(mean_c) * nonempty  # [B, 1]
        loss = -objective.sum() / n_seqs

        with torch.no_grad():
            lr = log_ratio.detach()
            clipped_low = (lr < -self.epsilon_low) & (adv < 0)  # [B, T]
            clipped_high = (lr > self.epsilon_high) & positive
            active = (adv != 0) & ~(clipped_low | clipped_high)
            metrics = policy_metrics(torch.exp(lr) * x.maskf, clipped_low, clipped_high, active, x.maskf)
        if self.needs_reference:
            weights = x.maskf / (n.clamp_min(1) * n_seqs)  # [B, T] per-response token mean, like the objective
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, weights)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics
