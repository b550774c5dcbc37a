"""What one rollout looked like, kept on the DataModule as ``last_rollout`` for callbacks to read."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutStats:
    """Per-rank numbers of one rollout (``epoch``); tensors are 1-D over this rank's responses.
    Callbacks reduce them across ranks (sums and counts), never average per-rank means."""

    epoch: int
    rewards: torch.Tensor  # [N] float, NaN where unscored
    correct: torch.Tensor  # [N] float, 1.0 where the accuracy reward says correct
    response_lengths: torch.Tensor  # [N] float, generated tokens incl. EOS
    truncated: torch.Tensor  # [N] float, 1.0 where no EOS within max_new_tokens
    zero_std_groups: int  # groups whose advantages are all zero
    num_groups: int
    dropped_groups: int  # removed by dynamic sampling
    generation_time_s: float
    scoring_time_s: float
    rollout_time_s: float  # generation + rewards + scoring
    generated_tokens: int
    engine_logprob_diff: torch.Tensor | None = None  # [n_tokens] |engine - trainer| log-prob
    samples: list[dict] = field(default_factory=list)  # a few {prompt, completion, reward}
    is_weights: torch.Tensor | None = None  # [n_tokens] truncated IS weights, when the correction is on
    is_cap: float = 0.0

    @property
    def reward_mean(self) -> float:
        r = self.rewards[~self.rewards.isnan()]
        return float(r.mean()) if r.numel() else 0.0
