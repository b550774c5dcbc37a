"""Off-policy (behaviour-policy) correction: per-token weights for what the engine sampled.

Three policies can differ in a rollout (decoupled PPO, as in AReaL): the *behaviour* policy that
sampled the tokens (the engine: its own kernels and precision, possibly stale weights), the
*proximal* policy whose log-probs the trainer recomputes before the first update on the rollout
(``old_logprobs``: the PPO ratio, ESPO's groups and clip ranges use it, unchanged), and the current
one. The behaviour weight of a sampled token is ``w_t = pi_old(y_t) / pi_engine(y_t) =
exp(old_logp_t - engine_logp_t)``; it multiplies the token's loss term. A positive, detached weight
on a term equals scaling its advantage (the clip decisions depend only on the sign of A), so the
weights fold into per-token advantages ``[B, T]`` and every loss supports them unchanged; a weight
of 0 removes the token's gradient while it still counts in the loss's normaliser (IcePop's
objective keeps ``1/|o|`` too).

Variants (``BehaviourCorrection``), with ``W`` the token's ``w_t`` (``level: token``) or its
response's weight, the same on every token of the response:

- ``level: sequence``: ``W = exp(sum_t log w_t)``, the product of the token ratios;
  ``level: geometric``: ``W = exp(mean_t log w_t)``, their geometric mean (length-normalised, as
  verl's ``geometric`` level); both over the response's valid tokens.
- ``mode: truncate`` (TIS; Yao et al., "Your efficient RL framework secretly brings you off-policy
  RL training", 2025; verl's and TRL's ``tis_imp_ratio_cap`` / ``vllm_importance_sampling_cap``):
  weight ``min(W, high)``. ``data.tis_cap: C`` is this at token level with ``high: C``: the
  engine's own kernels and precision make ``pi_engine`` differ from ``pi_old`` even on policy.
- ``mode: mask`` (MIS): weight ``W`` where ``low <= W <= high``, else 0 (the token, or the whole
  response at sequence level, is *masked*).
- ``mode: icepop`` (IcePop, Ling team, "Every Step Evolves", 2025): the two-sided token mask
  ``w_t`` where ``low <= w_t <= high``, else 0, with IcePop's bounds (0.5, 5) by default; token
  level only.

Numerics: each token's log-ratio is clamped to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` before any
exp (an engine log-prob of -inf, or a NaN, counts as the largest ratio: truncated to ``high`` or
masked), and the truncation and the bounds are applied in log space, so every weight is finite."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from espo_lightning.errors import ConfigError

LOG_RATIO_BOUND = 20.0  # |log w_t| beyond this (w_t outside [2e-9, 5e8]) is clamped; raw-ratio stats too
# The bounds a mode uses when ``low`` / ``high`` are left null: TIS's and verl's cap 2 (lower 1/2
# for the mask), IcePop's alpha = 0.5 and beta = 5.
DEFAULT_BOUNDS = {"truncate": (None, 2.0), "mask": (0.5, 2.0), "icepop": (0.5, 5.0)}


@dataclass
class BehaviourCorrection:
    """Weighting of each token's loss term by the behaviour ratio ``w_t = pi_old / pi_engine``
    (``data.behaviour_correction``; needs ``data.engine.init_args.return_logprobs: true``).

    Args:
        mode: ``truncate`` (TIS): weight ``min(W, high)``; ``mask`` (MIS): ``W`` where
            ``low <= W <= high``, else 0; ``icepop``: IcePop's two-sided token mask, ``w_t`` where
            ``low <= w_t <= high``, else 0.
        level: What ``W`` is: ``token`` (each token's own ratio), ``sequence`` (the product of the
            response's token ratios) or ``geometric`` (their geometric mean). ``icepop`` is token level.
        low: Lower bound of ``mask`` / ``icepop`` (default 0.5); ``truncate`` has none.
        high: The cap of ``truncate`` (default 2.0) and the upper bound of ``mask`` (default 2.0) and
            ``icepop`` (default 5.0).
    """

    mode: Literal["truncate", "mask", "icepop"] = "truncate"
    level: Literal["token", "sequence", "geometric"] = "token"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "data.behaviour_correction") -> None:
        """Raises a one-line ``ConfigError`` naming the first bad key under ``key``."""
        if self.mode not in DEFAULT_BOUNDS:
            raise ConfigError(f"{key}.mode must be one of truncate, mask, icepop, got {self.mode!r}")
        if self.level not in ("token", "sequence", "geometric"):
            raise ConfigError(f"{key}.level must be one of token, sequence, geometric, got {self.level!r}")
        if self.mode == "icepop" and self.level != "token":
            raise ConfigError(f"{key}.level must be token with mode icepop (a token mask), got {self.level!r}")
        if self.mode == "truncate" and self.low is not None:
            raise ConfigError(f"{key}.low is a bound of modes mask and icepop; truncate has none, got {self.low!r}")
        low, high = self.bounds
        if not (math.isfinite(high) and high > 0):
            raise ConfigError(f"{key}.high must be a finite number > 0, got {high!r}")
        if low is not None and not (math.isfinite(low) and 0 < low <= high):
            raise ConfigError(f"{key}.low must be > 0 and <= {key}.high ({high!r}), got {low!r}")

    @property
    def bounds(self) -> tuple[float | None, float]:
        """``(low, high)`` with the mode's defaults filled in (``low`` is None for truncate)."""
        low, high = DEFAULT_BOUNDS.get(self.mode, (None, 2.0))
        return (self.low if self.low is not None else low), (self.high if self.high is not None else high)


def behaviour_log_ratios(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``log w_t = old - engine`` per token, float32 (or the inputs' wider dtype), detached, clamped
    to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` (NaN and +inf to the upper end), 0 on invalid tokens:
    ``[B, T]``."""
    if old_logprobs.shape != engine_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"behaviour_log_ratios: shapes differ: old {tuple(old_logprobs.shape)}, "
                         f"engine {tuple(engine_logprobs.shape)}, mask {tuple(mask.shape)}")
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    log_ratio = old_logprobs.detach().to(dtype) - engine_logprobs.detach().to(dtype)  # [B, T]
    log_ratio = torch.nan_to_num(log_ratio, nan=LOG_RATIO_BOUND, posinf=LOG_RATIO_BOUND, neginf=-LOG_RATIO_BOUND)
    log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))


def behaviour_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor,
                      correction: BehaviourCorrection) -> tuple[Tensor, Tensor]:
    """The chosen variant's weights and which tokens it masked.

    Args:
        old_logprobs: ``[B, T]`` the trainer's (proximal policy's) log-probs of the sampled tokens.
        engine_logprobs: ``[B, T]`` the engine's (behaviour policy's) log-probs of the same tokens.
        mask: ``[B, T]`` bool, valid completion tokens.
        correction: The variant and its bounds.

    Returns:
        ``weights`` ``[B, T]`` (detached, finite, >= 0, 0 on invalid and masked tokens) and
        ``masked`` ``[B, T]`` bool (valid tokens the variant gave weight 0 by its bounds; never set
        by ``truncate``).
    """
    mask = mask.bool()
    log_w = behaviour_log_ratios(old_logprobs, engine_logprobs, mask)  # [B, T]
    if correction.level != "token":
        log_seq = log_w.sum(dim=1, keepdim=True)  # [B, 1]; invalid tokens hold 0
        if correction.level == "geometric":
            log_seq = log_seq / mask.sum(dim=1, keepdim=True).clamp(min=1)
        log_w = log_seq.expand_as(log_w)  # [B, T]
    low, high = correction.bounds
    log_high = math.log(high)
    weights = log_w.clamp(max=log_high).exp()  # [B, T]; under mask / icepop the clamp only touches masked tokens
    keep = mask if correction.mode == "truncate" else mask & (log_w >= math.log(low)) & (log_w <= log_high)
    return torch.where(keep, weights, torch.zeros_like(weights)), mask & ~keep


@dataclass
class BehaviourSummary:
    """One rank's raw behaviour ratios of a rollout, for ``RolloutStats`` (``rollout/behaviour_ratio/*``)."""

    ratios: Tensor  # [n_tokens] float32 on the CPU: w_t of every valid token (clamped log, see LOG_RATIO_BOUND)
    masked: int  # valid tokens the chosen variant gave weight 0 (0 without a correction or with truncate)
    weights: Tensor | None  # [n_tokens] float32 on the CPU: the applied weights, None without a correction


def apply_behaviour_correction(batch, correction: BehaviourCorrection | None) -> BehaviourSummary:
    """Folds the weights of ``correction`` into ``batch.advantages`` (``[B, T]`` afterwards) and
    returns the raw ratios' summary; with ``correction`` None only the summary is computed.
    ``batch`` is a ``RolloutBatch`` whose ``old_logprobs`` and ``engine_logprobs`` are set."""
    mask = batch.completion_mask.bool()
    ratios = behaviour_log_ratios(batch.old_logprobs, batch.engine_logprobs, mask)[mask].exp().float().cpu()
    if correction is None:
        return BehaviourSummary(ratios=ratios, masked=0, weights=None)
    w, masked = behaviour_weights(batch.old_logprobs, batch.engine_logprobs, mask, correction)  # [B, T]
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages.unsqueeze(1)
    batch.advantages = adv * w.to(adv.dtype)  # [B, T]
    return BehaviourSummary(ratios=ratios, masked=int(masked.sum()), weights=w[mask].float().cpu())
