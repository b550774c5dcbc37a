"""The shared base class of the policy losses and the small tensor helpers they all use.

Conventions (DESIGN sections 2 and 3): inputs are ``[B, T]`` float32/float64 tensors with a bool
``mask`` of valid tokens, advantages ``[B]`` or ``[B, T]``; a loss returns the quantity to
*minimise* and a dict of detached scalar metrics. Metrics are built from tensor reductions only
(no ``.item()``), so computing them costs no host synchronisation.
"""
from __future__ import annotations

import abc
import math
from typing import NamedTuple

import torch
from torch import Tensor

from espo_lightning.losses.kl import KL_ESTIMATORS, KLEstimator, kl_divergence

# exp(20) ~ 4.9e8: large enough that no real ratio is clamped, small enough that ratio * A and its
# gradient stay finite in float32 even for log-ratios of +-50 (e.g. a token whose old log-prob
# underflowed).
MAX_LOG_RATIO = 20.0


def check_range(
    owner: str,
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError("<owner>: <name> must be in <range>, got <value>")`` unless value is in range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{owner}: {name} must be in {left}{lo}, {hi}{right}, got {value!r}")


class Normalizer(NamedTuple):
    """The counts a loss divides by, when they are not the ones of the rows it is given.

    A minibatch split into micro-batches (and over ranks) is one optimizer step: every loss term must
    be divided by the *minibatch's* counts, summed over all ranks, so that the micro-batch losses add
    up to the whole minibatch's loss (DAPO's and CISPO's token means become the global token mean on
    any number of ranks). ``Normalizer.of(mask)`` gives the counts of a mask; sum them over ranks."""

    responses: Tensor  # [] responses with at least one valid token
    tokens: Tensor  # [] valid tokens

    @staticmethod
    def of(mask: Tensor) -> "Normalizer":
        mask = mask.bool()
        return Normalizer(mask.any(-1).sum().float(), mask.sum().float())


def denominators(x: "LossInputs", normalizer: Normalizer | None) -> tuple[Tensor, Tensor]:
    """``(responses, tokens)`` to divide by, in the loss dtype and >= 1: the normalizer's when given,
    else the counts of ``x.mask`` (responses with >= 1 valid token, valid tokens)."""
    if normalizer is None:
        responses = (x.maskf.sum(-1) > 0).sum().to(x.maskf.dtype)
        tokens = x.maskf.sum()
    else:
        responses, tokens = (v.to(device=x.maskf.device, dtype=x.maskf.dtype) for v in normalizer)
    return responses.clamp_min(1), tokens.clamp_min(1)


class LossInputs(NamedTuple):
    """Inputs after validation, with everything off-mask zeroed so padding (which may hold garbage
    or NaN) can never leak into a loss value or a gradient."""

    logp: Tensor  # [B, T] current log-probs, differentiable, 0 off-mask
    old_logp: Tensor  # [B, T] old log-probs, detached, 0 off-mask
    adv: Tensor  # [B, 1] (per-response advantages, broadcast lazily) or [B, T] (0 off-mask), detached
    mask: Tensor  # [B, T] bool
    maskf: Tensor  # [B, T] the mask as 0/1 in the loss dtype, for cheap masked sums


def canonical_inputs(
    owner: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> LossInputs:
    """Validate shapes and dtypes, zero the padding; ``[B]`` advantages become a ``[B, 1]`` view
    (materialising them as ``[B, T]`` would cost a full-size copy for nothing)."""
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(
            f"{owner}: logprobs must be a float [B, T] tensor, got {tuple(logprobs.shape)} {logprobs.dtype}"
        )
    if old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"{owner}: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    dtype = logprobs.dtype
    mask = mask.bool()
    advantages = advantages.detach().to(dtype)
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    elif advantages.shape == logprobs.shape:
        advantages = torch.where(mask, advantages, 0.0)  # [B, T]
    else:
        raise ValueError(f"{owner}: advantages must be [B] or [B, T] for logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    return LossInputs(
        logp=torch.where(mask, logprobs, 0.0),
        old_logp=torch.where(mask, old_logprobs.detach().to(dtype), 0.0),
        adv=advantages,
        mask=mask,
        maskf=mask.to(dtype),
    )


def token_log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """``sg(clamp(logp - old, -20, 20)) + logp - sg(logp)``: the value is the (clamped) log-ratio, the
    gradient is d/dlogp = 1 everywhere. A plain ``logp - old`` would have the same gradient but an
    unbounded value; ``clamp(logp - old)`` alone would lose the gradient beyond the clamp."""
    clamped = (logp.detach() - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    return clamped + (logp - logp.detach())


def clipped_token_term(ratio: Tensor, adv: Tensor, eps_low: Tensor | float, eps_high: Tensor | float):
    """PPO's per-token term ``l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (eq. 5).

    Returns ``(l_t, clipped_low, clipped_high)``: ``[B, T]`` loss terms and the bool masks of the
    tokens whose gradient the clip zeroes (r < 1 - eps_low with A < 0, r > 1 + eps_high with A > 0).
    ``eps_low`` / ``eps_high`` may be floats or ``[B, T]`` tensors (ESPO's per-group epsilon)."""
    low, high = 1.0 - eps_low, 1.0 + eps_high
    term = -torch.minimum(ratio * adv, torch.clamp(ratio, min=low, max=high) * adv)  # [B, T]
    r = ratio.detach()
    return term, (r < low) & (adv < 0), (r > high) & (adv > 0)


@torch.no_grad()
def policy_metrics(
    ratio: Tensor, clipped_low: Tensor, clipped_high: Tensor, active: Tensor, count: Tensor
) -> dict[str, Tensor]:
    """The metrics every loss reports (DESIGN section 2, "Diagnostics"), token-weighted.

    All arguments are ``[B, X]`` *units* that each stand for ``count`` valid tokens of response b:
    tokens (X = T, ``count`` = the float mask) or, for ESPO, whole entropy groups (``count`` = the
    group size), which makes the metrics as cheap as the group table. ``ratio`` is the ratio value
    and must be 0 where ``count`` is 0; ``clipped_*`` / ``active`` are bool (anything where count is 0
    is ignored). A unit is *active* when its policy gradient is nonzero. Empty reductions (no valid
    token) give 0, so every metric stays finite."""
    n_tokens = count.sum()  # []
    per_token = n_tokens.clamp_min(1)
    n_seqs = (count.sum(-1) > 0).sum().to(count.dtype)  # responses with >= 1 valid token
    n_low = (clipped_low * count).sum()
    n_high = (clipped_high * count).sum()
    active_count = active * count  # [B, X]
    return {
        "clip/low": n_low / per_token,
        "clip/high": n_high / per_token,
        "clip/total": (n_low + n_high) / per_token,
        "grad_util/token": active_count.sum() / per_token,
        "grad_util/sequence": (active_count.sum(-1) > 0).sum().to(count.dtype) / n_seqs.clamp_min(1),
        "ratio/mean": (ratio * count).sum() / per_token,
        "ratio/max": ratio.amax() if ratio.numel() else n_tokens,
        "count/tokens": n_tokens,
        "count/sequences": n_seqs,
    }


class PolicyLoss(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class of the policy losses: KL handling, the rollout hook and the shared contract.

    Subclasses implement ``forward(*, logprobs, old_logprobs, advantages, mask, entropies=None,
    ref_logprobs=None, group_ids=None, normalizer=None) -> (loss, metrics)``.
    """

    #: Whether ``forward`` reads the old policy's entropies (the trainer computes them only then).
    needs_entropies: bool = False

    def __init__(self, beta: float = 0.0, kl_estimator: KLEstimator = "k3") -> None:
        """
        Args:
            beta: weight of the KL penalty to the frozen reference policy; 0 disables it (and no
                reference model is loaded). Must be >= 0.
            kl_estimator: per-token KL estimator: "k1" (logp - ref), "k2" ((logp - ref)^2 / 2) or
                "k3" (exp(ref - logp) - (ref - logp) - 1).
        """
        super().__init__()
        owner = type(self).__name__
        check_range(owner, "beta", beta, 0.0)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"{owner}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        self.beta = float(beta)
        self.kl_estimator = kl_estimator

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def prepare(self, entropies: Tensor, mask: Tensor) -> Tensor | None:
        """Per-rollout precomputation (called once per rollout, not per optimisation step).

        ESPO returns the entropy group ids ``[B, T]``; the other losses need nothing and return None."""
        return None

    def prepare_minibatch(
        self,
        *,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        entropies: Tensor | None = None,
        group_ids: Tensor | None = None,
        step: int = 0,
        distributed: bool | None = None,
    ) -> Tensor | None:
        """Per-minibatch precomputation, once per optimizer step on every rank, before the minibatch is
        cut into micro-batches; the result is passed, row-sliced, to every ``forward`` of the step as
        ``group_ids``. Losses that choose tokens over the whole minibatch on all ranks (Clip-Cov,
        KL-Cov, the high-entropy mask: ``losses/selection.py``) do it here, with collectives over the
        default process group when ``distributed`` (None: when one of more than one rank is up).

        Args:
            old_logprobs, advantages, mask, entropies: this rank's whole minibatch (``[B, T]``,
                advantages ``[B]`` or ``[B, T]``).
            group_ids: what ``prepare`` gave for these rows (ESPO's entropy groups), or None.
            step: the optimizer step, for selections drawn at random (a new seed each step).
            distributed: reduce over ranks; None decides by ``torch.distributed``'s state.

        The default passes ``group_ids`` through unchanged."""
        return group_ids

    @property
    def prepares_per_response(self) -> bool:
        """Whether ``prepare`` looks at each response on its own, so that rows of a rollout can be
        prepared apart from the rest (the first update prepares its own rows: ``PolicyModule``)."""
        return True

    def set_vocab_size(self, v: int) -> None:
        """Tell the loss the vocabulary size (ESPO normalises entropies by log V); a no-op here."""

    @abc.abstractmethod
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
        """The loss to minimise (a scalar) and a dict of detached scalar metrics.

        Args:
            logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (float32/float64,
                differentiable).
            old_logprobs: ``[B, T]`` log-probs under the policy that generated the rollout.
            advantages: ``[B]`` per response or ``[B, T]`` per token.
            mask: ``[B, T]`` bool, True on the valid (non-pad) tokens; padding values are ignored.
            entropies: ``[B, T]`` old-policy entropies in nats (losses with ``needs_entropies``).
            ref_logprobs: ``[B, T]`` reference-policy log-probs (needed when ``beta > 0``).
            group_ids: ``[B, T]`` output of ``prepare`` for this minibatch's rows (ESPO); computed
                on the fly when None.
            normalizer: the response/token counts to divide by (``Normalizer``) when these rows are
                one micro-batch of a larger minibatch; None divides by the counts of ``mask``. The
                metrics always describe the rows given.
        """

    def kl_penalty(
        self, logp: Tensor, ref_logprobs: Tensor | None, mask: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``beta * sum_t w_t KL_t`` with the loss's own token weights ``w`` ``[B, T]`` (so the penalty
        is aggregated exactly like the policy term), plus the token-mean ``kl/mean`` metric.
        Losses call it only when ``needs_reference`` (beta > 0)."""
        if ref_logprobs is None:
            raise ValueError(
                f"{type(self).__name__}: beta={self.beta} > 0 needs ref_logprobs (the reference policy's "
                "log-probs of the sampled tokens), got None"
            )
        if ref_logprobs.shape != logp.shape:
            raise ValueError(f"{type(self).__name__}: ref_logprobs {tuple(ref_logprobs.shape)} must match "
                             f"logprobs {tuple(logp.shape)}")
        ref = torch.where(mask, ref_logprobs.detach().to(logp.dtype), 0.0)  # [B, T]
        kl = kl_divergence(logp, ref, self.kl_estimator)  # [B, T], 0 off-mask since logp = ref = 0 there
        n_tokens = torch.count_nonzero(mask).clamp_min(1)
        return self.beta * (kl * weights).sum(), {"kl/mean": kl.detach().sum() / n_tokens}
