"""Clip-Cov and KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

Entropy falls when tokens that are both likely and advantageous get reinforced: the paper traces
the entropy change to the covariance ``cov_t = (A_t - mean A) (logp_t - mean logp)`` (means over the
valid tokens of the minibatch, logp detached) and acts on the small fraction of tokens with the
largest covariance:

- **Clip-Cov**: among the tokens with ``cov_lb < cov_t < cov_ub``, a random ``clip_ratio`` fraction of
  all valid tokens (at least one; all candidates if fewer) gets zero gradient; the others keep the clipped PPO/GRPO term
  ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``. verl's defaults: 2e-4, bounds 1 and 5.
- **KL-Cov**: the ``kl_cov_ratio`` fraction of valid tokens (at least one) with the largest ``cov_t``
  get ``-r A + kl_coef |logp - old_logp|``; the others ``-r A``, unclipped, as in the paper and verl
  (``ppo_clip=True`` gives them the clipped PPO term instead). verl's defaults: 2e-4 and 1.0.

Both aggregate with verl's default, the token mean over the minibatch (``loss_aggregation``).

**Where the tokens are chosen** (``selection``). verl chooses in each loss call, from the *current*
log-probs of that call's rows, Clip-Cov excluding the tokens the PPO clip already binds on, with
torch's global generator (``selection="per_call"`` does exactly that). A choice per call depends on
how the minibatch is cut into micro-batches and ranks, so by default (``selection="minibatch"``) the
trainer chooses once per optimizer step over the whole minibatch on all ranks
(``prepare_minibatch``, ``losses/selection.py``), from the *old* (proximal) log-probs, which are
known for every row before the step, with a generator seeded from (``seed``, step). On the first,
on-policy update of a rollout the two coincide: there ``logp = old_logp``, every ratio is 1 and no
token is clipped, so verl's exclusion of clipped tokens is empty. On later updates the minibatch
choice lags by the steps already taken on the rollout; a chosen token that the PPO clip also binds
on has zero gradient either way.
"""
from __future__ import annotations

import abc
from typing import Literal

import torch
from torch import Tensor

from espo_lightning.losses.aggregation import LossAggregation, check_aggregation, token_weights
from espo_lightning.losses.base import (
    LossInputs,
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    clipped_token_term,
    policy_metrics,
    token_log_ratio,
)
from espo_lightning.losses.kl import KLEstimator
from espo_lightning.losses.selection import (
    distributed_default,
    random_draw,
    step_generator,
    token_covariance,
    top_count,
)

Selection = Literal["minibatch", "per_call"]
_SELECTIONS = ("minibatch", "per_call")


def selected_count(ratio: float, n_tokens: Tensor | float) -> int:
    """``max(1, floor(ratio * n))`` tokens for ``n >= 1`` valid tokens (verl's count), else 0."""
    n = int(n_tokens)
    return max(1, int(ratio * n)) if n > 0 else 0


class _CovarianceLoss(PolicyLoss):
    """What Clip-Cov and KL-Cov share: the covariance, where the choice is made, and how it travels.

    ``group_ids`` carries the chosen tokens (1) per token ``[B, T]`` from ``prepare_minibatch`` to
    ``forward``; a mask narrowing the loss (``HighEntropyMaskLoss``) may clear entries."""

    #: ``group_ids`` of this loss is a 0/1 token choice that a token mask may narrow.
    group_ids_select_tokens = True

    def __init__(self, owner: str, ratio_name: str, ratio: float, selection: Selection, seed: int,
                 epsilon_low: float, epsilon_high: float, loss_aggregation: LossAggregation,
                 beta: float, kl_estimator: KLEstimator) -> None:
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        check_range(owner, ratio_name, ratio, 0.0, 1.0, low_open=True)
        if selection not in _SELECTIONS:
            raise ValueError(f"{owner}: selection must be one of {_SELECTIONS}, got {selection!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{owner}: seed must be an integer >= 0, got {seed!r}")
        check_range(owner, "epsilon_low", epsilon_low, 0.0, 1.0)
        check_range(owner, "epsilon_high", epsilon_high, 0.0)
        check_aggregation(owner, loss_aggregation)
        self.owner = owner
        self.selection = selection
        self.seed = seed
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_aggregation = loss_aggregation

    @property
    def prepares_per_response(self) -> bool:
        # The minibatch choice needs every row's old log-probs before the step: no row may be left
        # for the first update to score itself (old_policy.score_rollout's defer_first).
        return self.selection == "per_call"

    @abc.abstractmethod
    def choose(self, cov: Tensor, n_tokens: Tensor, mask: Tensor, clipped: Tensor | None,
               generator: torch.Generator | None, distributed: bool) -> Tensor:
        """The chosen tokens ``[B, T]`` bool from the covariance ``cov`` of the rows (global means)."""

    def prepare_minibatch(self, *, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                          entropies: Tensor | None = None, group_ids: Tensor | None = None, step: int = 0,
                          distributed: bool | None = None) -> Tensor | None:
        if self.selection == "per_call":
            return group_ids
        distributed = distributed_default() if distributed is None else distributed
        mask = mask.bool()
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)  # [B, 1]
        cov, n_tokens = token_covariance(advantages, torch.where(mask, old_logprobs, 0.0), mask, distributed)
        chosen = self.choose(cov, n_tokens, mask, None, step_generator(self.seed, step), distributed)
        return chosen.long()  # [B, T]

    def chosen_tokens(self, x: LossInputs, group_ids: Tensor | None, clipped: Tensor | None) -> Tensor:
        """The chosen tokens of these rows: ``prepare_minibatch``'s (minibatch mode, when given), else
        chosen from these rows alone: from the current log-probs (per_call, verl) or the old ones."""
        if self.selection == "minibatch" and group_ids is not None:
            if group_ids.shape != x.mask.shape:
                raise ValueError(f"{self.owner}: group_ids {tuple(group_ids.shape)} must match mask "
                                 f"{tuple(x.mask.shape)}")
            return group_ids.bool() & x.mask
        logp = x.logp if self.selection == "per_call" else x.old_logp
        cov, n_tokens = token_covariance(x.adv, logp, x.mask, distributed=False)
        return self.choose(cov, n_tokens, x.mask, clipped if self.selection == "per_call" else None,
                           generator=None, distributed=False)

    def _ppo_term(self, ratio: Tensor, adv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return clipped_token_term(ratio, adv, self.epsilon_low, self.epsilon_high)


class ClipCovLoss(_CovarianceLoss):
    """Clip-Cov: the clipped PPO/GRPO term, with a random few high-covariance tokens detached."""

    def __init__(
        self,
        clip_ratio: float = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_aggregation: LossAggregation = "token_mean",
        selection: Selection = "minibatch",
        seed: int = 0,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            clip_ratio: fraction of the minibatch's valid tokens whose gradient is detached (at least
                one token); in (0, 1]. verl's default 2e-4.
            cov_lb: a token is a candidate when its covariance is above this (verl: 1.0).
            cov_ub: ... and below this (verl: 5.0); > cov_lb.
            epsilon_low: PPO clip width below 1; in [0, 1].
            epsilon_high: PPO clip width above 1; >= 0.
            loss_aggregation: "token_mean" (verl's default: over all valid tokens of the minibatch)
                or "seq_mean_token_mean" (GRPO's).
            selection: "minibatch" (default: chosen once per step over the whole minibatch on all
                ranks, from the old log-probs, with a generator seeded per step) or "per_call"
                (verl: in each loss call, from the current log-probs of the call's rows, excluding
                tokens the PPO clip binds on, torch's global generator).
            seed: seed of the per-step draw (combined with the optimizer step); >= 0.
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__("ClipCovLoss", "clip_ratio", clip_ratio, selection, seed, epsilon_low, epsilon_high,
                         loss_aggregation, beta, kl_estimator)
        check_range("ClipCovLoss", "cov_lb", cov_lb)
        check_range("ClipCovLoss", "cov_ub", cov_ub, cov_lb, low_open=True)
        self.clip_ratio = float(clip_ratio)
        self.cov_lb = float(cov_lb)
        self.cov_ub = float(cov_ub)

    def choose(self, cov, n_tokens, mask, clipped, generator, distributed):
        candidates = mask & (cov > self.cov_lb) & (cov < self.cov_ub)  # [B, T]
        if clipped is not None:
            candidates = candidates & ~clipped
        return random_draw(cov, candidates, selected_count(self.clip_ratio, n_tokens), generator, distributed)

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
        x = canonical_inputs("ClipCovLoss", logprobs, old_logprobs, advantages, mask)
        ratio = torch.exp(token_log_ratio(x.logp, x.old_logp))  # [B, T]
        term, clipped_low, clipped_high = self._ppo_term(ratio, x.adv)
        clipped = (clipped_low | clipped_high) & x.mask
        detached = self.chosen_tokens(x, group_ids, clipped)  # [B, T] bool
        weights = token_weights(x, normalizer, self.loss_aggregation)
        loss = (term * weights * ~detached).sum()

        with torch.no_grad():
            active = (x.adv != 0) & ~clipped & ~detached
            metrics = policy_metrics(ratio.detach() * x.maskf, clipped_low, clipped_high, active, x.maskf)
            metrics["cov/selected"] = (detached * x.maskf).sum() / x.maskf.sum().clamp_min(1)
        if self.needs_reference:
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, weights)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics


class KLCovLoss(_CovarianceLoss):
    """KL-Cov: the unclipped policy gradient, plus ``kl_coef |logp - old_logp|`` on the few tokens
    with the largest covariance."""

    def __init__(
        self,
        kl_cov_ratio: float = 2e-4,
        kl_coef: float = 1.0,
        ppo_clip: bool = False,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_aggregation: LossAggregation = "token_mean",
        selection: Selection = "minibatch",
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            kl_cov_ratio: fraction of the minibatch's valid tokens (at least one), those with the
                largest covariance, that get the penalty; in (0, 1]. verl's default 2e-4.
            kl_coef: weight of the penalty ``|logp - old_logp|`` on those tokens; >= 0 (verl: 1.0).
            ppo_clip: False (the paper, verl): the other tokens get the unclipped ``-r A``. True: they
                get the clipped PPO term with epsilon_low / epsilon_high.
            epsilon_low: PPO clip width below 1 when ppo_clip; in [0, 1].
            epsilon_high: PPO clip width above 1 when ppo_clip; >= 0.
            loss_aggregation: "token_mean" (verl's default) or "seq_mean_token_mean" (GRPO's).
            selection: "minibatch" (default: chosen once per step over the whole minibatch on all
                ranks, from the old log-probs) or "per_call" (verl: in each loss call, from the
                current log-probs of the call's rows).
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__("KLCovLoss", "kl_cov_ratio", kl_cov_ratio, selection, 0, epsilon_low, epsilon_high,
                         loss_aggregation, beta, kl_estimator)
        check_range("KLCovLoss", "kl_coef", kl_coef, 0.0)
        self.kl_cov_ratio = float(kl_cov_ratio)
        self.kl_coef = float(kl_coef)
        self.ppo_clip = bool(ppo_clip)

    def choose(self, cov, n_tokens, mask, clipped, generator, distributed):
        return top_count(cov, mask, selected_count(self.kl_cov_ratio, n_tokens), distributed)

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
        x = canonical_inputs("KLCovLoss", logprobs, old_logprobs, advantages, mask)
        log_ratio = token_log_ratio(x.logp, x.old_logp)  # [B, T]
        ratio = torch.exp(log_ratio)
        if self.ppo_clip:
            other, clipped_low, clipped_high = self._ppo_term(ratio, x.adv)
        else:
            other = -ratio * x.adv
            clipped_low = clipped_high = torch.zeros_like(x.mask)
        penalised = self.chosen_tokens(x, group_ids, None)  # [B, T] bool
        term = torch.where(penalised, -ratio * x.adv + self.kl_coef * log_ratio.abs(), other)
        weights = token_weights(x, normalizer, self.loss_aggregation)
        loss = (term * weights).sum()

        with torch.no_grad():
            clipped = (clipped_low | clipped_high) & ~penalised  # a penalised token is never clipped
            clipped_low, clipped_high = clipped_low & clipped, clipped_high & clipped
            active = (x.adv != 0) & ~clipped
            metrics = policy_metrics(ratio.detach() * x.maskf, clipped_low, clipped_high, active, x.maskf)
            metrics["cov/selected"] = (penalised * x.maskf).sum() / x.maskf.sum().clamp_min(1)
        if self.needs_reference:
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, weights)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics


