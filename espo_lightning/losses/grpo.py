"""GRPO (DESIGN eq. 1) and DAPO: per-token clipped ratios, two ways to aggregate.

Written with plain masked means (no scatter) on purpose: the tests check that ESPO with
``grouping="token"`` and fixed epsilons equals this loss, which only means something if the two are
computed independently.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from espo_lightning.losses.base import (
    LossInputs,
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    clipped_token_term,
    denominators,
    policy_metrics,
    token_log_ratio,
)
from espo_lightning.losses.kl import KLEstimator

LossAggregation = Literal["seq_mean_token_mean", "token_mean"]
_AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


class GRPOLoss(PolicyLoss):
    """GRPO: ``l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)`` with per-token ratios.

    DAPO is ``GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean")`` (clip-higher plus the
    token-level mean over the whole minibatch).
    """

    def __init__(
        self,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_aggregation: LossAggregation = "seq_mean_token_mean",
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            epsilon_low: lower clip width, the ratio is clipped at 1 - epsilon_low; in [0, 1].
            epsilon_high: upper clip width, the ratio is clipped at 1 + epsilon_high; >= 0
                (DAPO's clip-higher uses 0.28).
            loss_aggregation: "seq_mean_token_mean" (GRPO: mean over each response's tokens, then
                over responses) or "token_mean" (DAPO: mean over all valid tokens of the minibatch).
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range("GRPOLoss", "epsilon_low", epsilon_low, 0.0, 1.0)
        check_range("GRPOLoss", "epsilon_high", epsilon_high, 0.0)
        if loss_aggregation not in _AGGREGATIONS:
            raise ValueError(f"GRPOLoss: loss_aggregation must be one of {_AGGREGATIONS}, got {loss_aggregation!r}")
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_aggregation = loss_aggregation

    def token_weights(self, x: LossInputs, normalizer: Normalizer | None = None) -> Tensor:
        """``w_t`` ``[B, T]`` with ``loss = sum_t w_t l_t`` for the chosen aggregation (0 off-mask)."""
        n_seqs, n_tokens = denominators(x, normalizer)
        if self.loss_aggregation == "token_mean":
            return x.maskf / n_tokens
        return x.maskf / (x.maskf.sum(-1, keepdim=True).clamp_min(1) * n_seqs)

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
        x = canonical_inputs("GRPOLoss", logprobs, old_logprobs, advantages, mask)
        ratio = torch.exp(token_log_ratio(x.logp, x.old_logp))  # [B, T], value r_t, grad r_t dlogp
        term, clipped_low, clipped_high = clipped_token_term(ratio, x.adv, self.epsilon_low, self.epsilon_high)
        term = term * x.maskf  # [B, T]
        n_seqs, n_tokens = denominators(x, normalizer)
        if self.loss_aggregation == "token_mean":
            loss = term.sum() / n_tokens
        else:
            per_response = term.sum(-1) / x.maskf.sum(-1).clamp_min(1)  # [B]
            loss = per_response.sum() / n_seqs
        active = (x.adv != 0) & ~(clipped_low | clipped_high)  # [B, T]
        metrics = policy_metrics(ratio.detach() * x.maskf, clipped_low, clipped_high, active, x.maskf)
        if self.needs_reference:
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, self.token_weights(x, normalizer))
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics
