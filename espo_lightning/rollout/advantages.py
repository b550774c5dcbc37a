"""Group-normalised advantages (DESIGN section 2, paper eq. 11).

Rollouts come prompt-major: entries ``p * G .. p * G + G - 1`` are the G responses to prompt p.
Within each group, over the responses S the verifier could score (reward not NaN / None):
``A_i = (R_i - mean_S R) / (std_S R + eps)``; unscored responses get 0, and the whole group gets 0
when |S| < 2 or every scored reward is equal (no learning signal, and no NaN).

The standard deviation is the unbiased one (divide by |S| - 1) by default, as TRL and verl compute
it with ``torch.std``; ``unbiased_std=False`` divides by |S|.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def rewards_to_tensor(rewards: Sequence[float | None]) -> Tensor:
    """Reward functions' ``list[float | None]`` as a float32 tensor ``[N]`` with NaN for ``None``."""
    return torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float32)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, unbiased_std: bool = True) -> Tensor:
    """Advantages ``[P * G]`` from rewards ``[P * G]`` (NaN = unscored), normalised per group of G.

    Args:
        rewards: ``[P * G]`` rewards, prompt-major, NaN where the verifier returned None.
        group_size: G, the number of responses per prompt; >= 1 and dividing the number of rewards.
        eps: added to the standard deviation; >= 0.
        unbiased_std: divide the variance by |S| - 1 (True, like ``torch.std``) or by |S|.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be an integer >= 1, got {group_size!r}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [P * G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: the number of rewards ({rewards.numel()}) must be a multiple of "
            f"group_size ({group_size})"
        )
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"group_advantages: eps must be in [0, inf), got {eps!r}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)

    r = rewards.view(-1, group_size)  # [P, G]
    scored = ~torch.isnan(r)  # [P, G]
    n = scored.sum(-1, keepdim=True).to(r.dtype)  # [P, 1]
    r0 = torch.where(scored, r, 0.0)  # [P, G] NaN-free, so nothing below can become NaN
    mean = r0.sum(-1, keepdim=True) / n.clamp_min(1)  # [P, 1]
    centred = torch.where(scored, r0 - mean, 0.0)  # [P, G]
    dof = (n - 1) if unbiased_std else n
    std = (centred.square().sum(-1, keepdim=True) / dof.clamp_min(1)).sqrt()  # [P, 1]
    # All-equal is tested exactly (max == min) rather than std == 0, which rounding can miss.
    highest = torch.where(scored, r0, -math.inf).amax(-1, keepdim=True)  # [P, 1]
    lowest = torch.where(scored, r0, math.inf).amin(-1, keepdim=True)  # [P, 1]
    spread = highest > lowest
    informative = (n >= 2) & spread  # [P, 1]
    adv = torch.where(scored & informative, centred / (std + eps), 0.0)  # [P, G]
    return adv.reshape(-1)
