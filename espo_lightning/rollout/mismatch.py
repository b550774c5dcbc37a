"""Truncated importance sampling (TIS) for the rollout engine / trainer mismatch.

The engine samples with its own kernels and precision (vLLM in bf16, fused attention), so the
distribution it samples from, ``pi_engine``, is not exactly the trainer's ``pi_old`` whose log-probs
the losses use. The policy-gradient estimate is then off-policy by the factor
``pi_old / pi_engine`` per token. TIS multiplies each token's loss term by that ratio, truncated
at ``cap`` so that tokens the engine sampled with a much lower probability than the trainer assigns
cannot blow up the gradient (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025; offered by verl and TRL as ``tis_imp_ratio_cap`` /
``vllm_importance_sampling_cap``)."""
from __future__ import annotations

import torch
from torch import Tensor


def truncated_is_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float = 2.0) -> Tensor:
    """Per-token weights ``min(exp(old - engine), cap)`` on valid tokens, 0 elsewhere: ``[B, T]``.

    Args:
        old_logprobs: ``[B, T]`` trainer log-probs of the sampled tokens (the rollout's ``old_logprobs``).
        engine_logprobs: ``[B, T]`` the engine's log-probs of the same tokens.
        mask: ``[B, T]`` bool, valid completion tokens.
        cap: Upper bound of a weight (> 0).

    The weights carry no gradient (both inputs are rollout constants); they are computed in float32
    or the inputs' own wider dtype.
    """
    if not cap > 0:
        raise ValueError(f"truncated_is_weights: cap must be > 0, got {cap}")
    if old_logprobs.shape != engine_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"truncated_is_weights: shapes differ: old {tuple(old_logprobs.shape)}, "
                         f"engine {tuple(engine_logprobs.shape)}, mask {tuple(mask.shape)}")
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    log_ratio = (old_logprobs.detach().to(dtype) - engine_logprobs.detach().to(dtype))  # [B, T]
    # Clamp the log-ratio, not the ratio: exp of a huge difference would overflow to inf first.
    weights = log_ratio.clamp(max=torch.log(torch.tensor(cap, dtype=dtype)).item()).exp()  # [B, T]
    return torch.where(mask.bool(), weights, torch.zeros_like(weights))


def apply_tis(batch, cap: float) -> Tensor:
    """Weight each token of ``batch`` (a ``RolloutBatch`` with engine log-probs) by
    ``min(pi_old / pi_engine, cap)``, returning the valid tokens' weights for the logs. A positive,
    detached weight on a token's term equals scaling its advantage (the clip decisions depend only on
    the sign of A), so the correction becomes per-token advantages ``[B, T]`` and every loss supports
    it unchanged."""
    w = truncated_is_weights(batch.old_logprobs, batch.engine_logprobs, batch.completion_mask, cap)
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages.unsqueeze(1)
    batch.advantages = adv * w  # [B, T]
    return w[batch.completion_mask].float().cpu()
