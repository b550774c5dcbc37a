"""What one rollout looked like, kept on the DataModule as ``last_rollout`` for callbacks to read."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from espo_lightning.data.messages import as_text
from espo_lightning.rewards.math import completion_text


@dataclass
class RolloutStats:
    """Per-rank numbers of one rollout (``epoch``); tensors are 1-D over every response this rank
    generated (all sampling rounds, kept or not).
    Callbacks reduce them across ranks (sums and counts), never average per-rank means."""

    epoch: int
    rewards: torch.Tensor  # [N] float, NaN where unscored
    correct: torch.Tensor  # [N] float, 1.0 where the accuracy reward says correct
    response_lengths: torch.Tensor  # [N] float, generated tokens incl. EOS
    truncated: torch.Tensor  # [N] float, 1.0 where no EOS within max_new_tokens
    zero_std_groups: int  # generated groups whose advantages are all zero
    num_groups: int  # prompt groups generated (all sampling rounds)
    dropped_groups: int  # generated groups not trained with weight (dynamic sampling)
    generation_time_s: float
    scoring_time_s: float
    rollout_time_s: float  # generation + rewards + scoring
    generated_tokens: int
    engine_logprob_diff: torch.Tensor | None = None  # [n_tokens] |engine - trainer| log-prob
    samples: list[dict] = field(default_factory=list)  # a few {prompt, completion, reward}
    is_weights: torch.Tensor | None = None  # [n_tokens] truncated IS weights, when the correction is on
    is_cap: float = 0.0
    behaviour_ratio: torch.Tensor | None = None  # [n_tokens] raw pi_old / pi_engine, whenever engine log-probs exist
    behaviour_masked: int = 0  # valid tokens data.behaviour_correction gave weight 0 (mask, icepop)
    sampling_rounds: int = 1  # generation rounds (dynamic sampling refills)
    prompt_truncated: int = 0  # prompts (groups) cut to max_prompt_length
    reward_timeouts: int = 0  # completions on which a reward function hit its time limit
    policy_version: int | None = None  # trainer global step of the oldest weights a round sampled from
    staleness: int = 0  # rollouts trained since those weights (data.max_staleness bounds it)
    generation_wait_s: float = 0.0  # the trainer blocked on the engine's generate calls / submitted results
    engine_generation_s: float = 0.0  # the engine's own time on them (request to answer); = the wait when in-process
    weight_sync_s: float = 0.0  # the trainer's time pushing weights to the engine for this rollout

    @property
    def reward_mean(self) -> float:
        r = self.rewards[~self.rewards.isnan()]
        return float(r.mean()) if r.numel() else 0.0


def rollout_stats(sampled, *, epoch: int, samples: int, **timings_and_extras) -> RolloutStats:
    """The stats of a ``sampling.SampledRollout``, over every generated completion (all rounds):
    what the policy does, not what dynamic sampling kept. ``samples`` first completions of distinct
    groups are kept as text for the logs."""
    gen = sampled.generated
    G = gen.G
    lengths = torch.tensor([len(c) for c in gen.completion_ids], dtype=torch.float32)
    return RolloutStats(
        epoch=epoch, rewards=gen.rewards, correct=gen.correct, response_lengths=lengths,
        truncated=torch.tensor(gen.truncated, dtype=torch.float32),
        zero_std_groups=int((~gen.has_variance).sum()), num_groups=len(gen), dropped_groups=sampled.dropped,
        generated_tokens=int(lengths.sum()), sampling_rounds=sampled.rounds,
        prompt_truncated=sum(gen.prompt_truncated), reward_timeouts=int(gen.timed_out.sum()),
        samples=[{"prompt": as_text(gen.rows[g]["prompt"]), "completion": completion_text(gen.completions[g * G]),
                  "reward": None if gen.rewards[g * G].isnan() else float(gen.rewards[g * G])}
                 for g in range(min(samples, len(gen)))],
        **timings_and_extras)
