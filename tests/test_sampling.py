"""Dynamic sampling as DAPO does it: rounds of fresh prompt groups until the rollout holds its
groups with reward variance, bounded by ``max_sampling_rounds``; the rollout's size never shrinks."""
from __future__ import annotations

import torch

from espo_lightning.rollout.advantages import group_advantages
from espo_lightning.rollout.sampling import Groups, sample_rounds

G = 2


def _groups(rewards_per_group: list[tuple[float, float]], tag: str) -> Groups:
    rewards = torch.tensor([r for pair in rewards_per_group for r in pair])
    n = len(rewards)
    return Groups(G=G, rows=[{"prompt": f"{tag}{g}"} for g in range(len(rewards_per_group))],
                  prompt_ids=[[g] for g in range(len(rewards_per_group))], prompt_truncated=[False] * len(rewards_per_group),
                  completion_ids=[[i] for i in range(n)], completions=[f"{tag}c{i}" for i in range(n)],
                  truncated=[False] * n, engine_logprobs=None, rewards=rewards, correct=rewards.clone(),
                  timed_out=torch.zeros(n, dtype=torch.bool), advantages=group_advantages(rewards, G))


SAME, MIXED = (1.0, 1.0), (0.0, 1.0)


def test_rounds_refill_until_the_rollout_holds_its_groups_with_variance():
    plan = {0: [SAME, MIXED, SAME], 1: [MIXED, SAME, SAME], 2: [MIXED, MIXED, SAME]}
    calls = []

    def generate(r):
        calls.append(r)
        return _groups(plan[r], f"r{r}g")

    out = sample_rounds(generate, needed=3, dynamic=True, max_rounds=10)
    assert calls == [0, 1, 2] and out.rounds == 3 and out.padded == []
    # the first three groups with variance, in round order; the surplus one of round 2 is discarded
    assert [out.generated.rows[g]["prompt"] for g in out.chosen] == ["r0g1", "r1g0", "r2g0"]
    assert out.dropped == 9 - 3
    kept = out.generated.take(out.chosen)
    assert len(kept) == 3 and kept.completions == ["r0gc2", "r0gc3", "r1gc0", "r1gc1", "r2gc0", "r2gc1"]
    assert kept.has_variance.all()


def test_rounds_stop_at_the_bound_and_pad_with_zero_variance_groups():
    out = sample_rounds(lambda r: _groups([SAME, MIXED, SAME], f"r{r}g"), needed=3, dynamic=True, max_rounds=2)
    assert out.rounds == 2 and len(out.chosen) == 3
    assert [out.generated.rows[g]["prompt"] for g in out.chosen] == ["r0g1", "r1g1", "r0g0"]
    assert [out.generated.rows[g]["prompt"] for g in out.padded] == ["r0g0"]
    assert out.dropped == 6 - 2


def test_the_decision_to_go_on_is_global():
    """A rank that has its groups still generates while another rank is short (``fewest`` is the
    minimum over ranks): every rank runs the same number of rounds."""
    counts = iter([1, 3])  # the other rank's totals after round 0 and 1
    out = sample_rounds(lambda r: _groups([MIXED, MIXED, MIXED], f"r{r}g"), needed=3, dynamic=True, max_rounds=5,
                        fewest=lambda mine: min(mine, next(counts)))
    assert out.rounds == 2 and [out.generated.rows[g]["prompt"] for g in out.chosen] == ["r0g0", "r0g1", "r0g2"]


def test_without_dynamic_sampling_one_round_is_kept_whole():
    out = sample_rounds(lambda r: _groups([SAME, MIXED], "g"), needed=2, dynamic=False, max_rounds=10)
    assert out.rounds == 1 and out.chosen == [0, 1] and out.padded == [] and out.dropped == 0
