"""Sampling rounds: DAPO's dynamic sampling.

Without dynamic sampling a rollout is one round: each rank generates G completions for its
P / world_size prompts. With ``drop_zero_std_groups`` a group whose rewards do not vary (all right,
all wrong) has zero advantages and teaches nothing, so it is dropped, and fresh prompt groups are
generated in further rounds until every rank holds its P / world_size groups with reward variance,
or ``max_sampling_rounds`` is reached. Every round draws the next P prompts of the data walk on
every rank together, and the decision to go on is global (the fewest groups any rank holds), so
ranks run the same number of ``generate`` calls (sharded generation is a collective).

The rollout keeps exactly P / world_size groups per rank, so minibatch sizes never shrink: the first
groups with variance in round order, and surplus ones from the last round are discarded, as in
DAPO. If the rounds run out first, the shortfall is filled with zero-variance groups whose
completions are masked (no weight, no tokens in the loss normalisation), and a warning says so."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch


@dataclass
class Groups:
    """Prompt groups of ``G`` completions each; per-completion lists are group-major
    (completion ``g * G + j`` is sample j of group g)."""

    G: int
    rows: list[dict]  # the data row of each group
    prompt_ids: list[list[int]]  # per group, after the max_prompt_length cut
    prompt_truncated: list[bool]  # per group: the prompt lost its first tokens
    completion_ids: list[list[int]]  # per completion, EOS included when generated
    completions: list  # per completion, as the reward functions received it (text or messages)
    truncated: list[bool]  # per completion: stopped at max_new_tokens without EOS
    engine_logprobs: list[list[float]] | None  # per completion, when the engine returns them
    rewards: torch.Tensor  # [n] float, NaN where no reward function could score
    correct: torch.Tensor  # [n] float, 1.0 where the accuracy reward says correct
    timed_out: torch.Tensor  # [n] bool, a reward function hit its time limit
    advantages: torch.Tensor  # [n] float, group-normalised

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_variance(self) -> torch.Tensor:
        """[groups] bool: some advantage of the group is non-zero."""
        return ~(self.advantages.view(-1, self.G) == 0).all(dim=1)

    def take(self, groups: list[int]) -> "Groups":
        per_completion = [g * self.G + j for g in groups for j in range(self.G)]
        index = torch.tensor(per_completion, dtype=torch.long)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "G" or value is None:
                continue
            if isinstance(value, torch.Tensor):
                values[f.name] = value[index]
            elif f.name in ("rows", "prompt_ids", "prompt_truncated"):
                values[f.name] = [value[g] for g in groups]
            else:
                values[f.name] = [value[i] for i in per_completion]
        return replace(self, **values)

    @staticmethod
    def cat(parts: list["Groups"]) -> "Groups":
        first = parts[0]
        values = {}
        for f in fields(first):
            if f.name == "G":
                continue
            items = [getattr(p, f.name) for p in parts]
            if any(x is None for x in items):
                values[f.name] = None
            elif isinstance(items[0], torch.Tensor):
                values[f.name] = torch.cat(items)
            else:
                values[f.name] = [x for item in items for x in item]
        return replace(first, **values)


@dataclass
class SampledRollout:
    generated: Groups  # every group of every round
    chosen: list[int]  # the groups trained on, indices into ``generated``
    padded: list[int]  # the subset of ``chosen`` that is zero-variance filler (masked)
    rounds: int

    @property
    def dropped(self) -> int:
        """Generated groups that carry no weight in training: zero-variance ones (filler included)
        and surplus groups with variance from the last round."""
        return len(self.generated) - (len(self.chosen) - len(self.padded))


def sample_rounds(generate_round: Callable[[int], Groups], needed: int, dynamic: bool, max_rounds: int,
                  fewest: Callable[[int], int] = lambda k: k) -> SampledRollout:
    """Run ``generate_round(r)`` for r = 0, 1, ... until this rank (and, through ``fewest``, which
    returns the smallest count over ranks, every rank) holds ``needed`` groups with variance, or
    ``max_rounds`` rounds ran. Without ``dynamic`` one round is all, and all of it is kept."""
    rounds = [generate_round(0)]
    if not dynamic:
        return SampledRollout(generated=rounds[0], chosen=list(range(len(rounds[0]))), padded=[], rounds=1)
    while fewest(sum(int(r.has_variance.sum()) for r in rounds)) < needed and len(rounds) < max_rounds:
        rounds.append(generate_round(len(rounds)))
    generated = Groups.cat(rounds)
    varied = generated.has_variance.nonzero().flatten().tolist()
    chosen = varied[:needed]
    padded = (~generated.has_variance).nonzero().flatten().tolist()[: needed - len(chosen)]
    return SampledRollout(generated=generated, chosen=chosen + padded, padded=padded, rounds=len(rounds))
