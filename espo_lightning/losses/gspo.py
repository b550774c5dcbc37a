"""GSPO (DESIGN eq. 2-4) in its GSPO-token form: one length-normalised ratio per response.

``log s_i = mean_t (logp - old_logp)`` (detached, clamped to [-20, 20]) and per token
``log s_{i,t} = sg(log s_i) + logp_t - sg(logp_t)``: the value is ``s_i`` on every token, the gradient
flows through each token's own log-prob. With a ``[B]`` advantage this is exactly sequence-level GSPO;
a ``[B, T]`` advantage gives GSPO-token.

Written with plain masked means (no scatter) on purpose: the tests check that ESPO with
``grouping="sequence"`` and fixed epsilons equals this loss, which only means something if the two
are computed independently.
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


class GSPOLoss(PolicyLoss):
    """Group Sequence Policy Optimization with the paper's clip widths 3e-4 / 4e-4."""

    def __init__(
        self,
        epsilon_low: float = 3e-4,
        epsilon_high: float = 4e-4,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            epsilon_low: lower clip width of the sequence ratio (clipped at 1 - epsilon_low); in [0, 1].
            epsilon_high: upper clip width of the sequence ratio (clipped at 1 + epsilon_high); >= 0.
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range("GSPOLoss", "epsilon_low", epsilon_low, 0.0, 1.0)
        check_range("GSPOLoss", "epsilon_high", epsilon_high, 0.0)
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
        x = canonical_inputs("GSPOLoss", logprobs, old_logprobs, advantages, mask)
        logp, adv, dtype = x.logp, x.adv, x.logp.dtype
        n = x.maskf.sum(-1, keepdim=True)  # [B, 1] valid tokens per response
        n_seqs, _ = denominators(x, normalizer)

        log_s = (logp.detach() - x.old_logp).sum(-1, keepdim=True) / n.clamp_min(1)  # [B, 1], padding is 0
        log_s = log_s.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        ratio = torch.exp(log_s + logp - logp.detach())  # [B, T] value s_i, gradient s_i * dlogp_t

        low, high = 1.0 - self.epsilon_low, 1.0 + self.epsilon_high
        term = -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)  # [B, T]
        per_response = (term * x.maskf).sum(-1) / n.squeeze(-1).clamp_min(1)  # [B]
        loss = per_response.sum() / n_seqs

        with torch.no_grad():
            s = ratio.detach()
            clipped_low = (s < low) & (adv < 0) & x.mask  # [B, T]
            clipped_high = (s > high) & (adv > 0) & x.mask
            active = (adv != 0) & ~(clipped_low | clipped_high)  # [B, T]
            metrics = policy_metrics(s * x.maskf, clipped_low, clipped_high, active, x.maskf)
            clipped_seq = (clipped_low | clipped_high).any(-1)  # [B], False for empty responses
            metrics["clip/sequence"] = clipped_seq.sum().to(dtype) / (n.squeeze(-1) > 0).sum().to(dtype).clamp_min(1)
        if self.needs_reference:
            weights = x.maskf / (n.clamp_min(1) * n_seqs)  # [B, T] the same per-response token mean
            kl_loss, kl_metrics = self.kl_penalty(logp, ref_logprobs, x.mask, weights)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics
