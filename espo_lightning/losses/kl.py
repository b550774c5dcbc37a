"""Per-token estimators of KL(pi_theta || pi_ref) from the log-probs of the sampled tokens.

With ``d = ref_logp - logp`` (samples drawn from pi_theta, Schulman's "Approximating KL divergence"):
- k1 = -d = logp - ref_logp: unbiased, high variance, can be negative;
- k2 = d^2 / 2: biased, low variance, >= 0;
- k3 = exp(d) - d - 1: unbiased, low variance, >= 0 (the GRPO paper's choice, our default).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is far beyond any useful KL value and finite in float16/bfloat16/float32; the clamp
# keeps a token the reference finds impossible (d = +-inf after masking bugs, or huge) from
# producing inf/NaN in the loss or its gradient.
_MAX_LOG_RATIO = 20.0


def _k1(d: Tensor) -> Tensor:
    return -d


def _k2(d: Tensor) -> Tensor:
    return 0.5 * d.square()


def _k3(d: Tensor) -> Tensor:
    return torch.exp(d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)) - d - 1.0


_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_divergence(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Elementwise KL estimate ``[B, T]``; differentiable in ``logprobs``, ``ref_logprobs`` is detached.

    Args:
        logprobs: current policy log-probs of the sampled tokens, ``[B, T]``.
        ref_logprobs: reference policy log-probs of the same tokens, ``[B, T]``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = ref_logprobs.detach().to(logprobs.dtype) - logprobs  # [B, T]
    return _ESTIMATORS[estimator](d)
