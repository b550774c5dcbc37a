"""Evaluation metrics from per-problem results: greedy accuracy, avg@k, the unbiased pass@k.

Every rank evaluates its share of a set's problems; the per-problem results (a handful of numbers
each) are gathered to every rank and the metrics computed from the whole set, in problem order,
with exactly rounded sums (``math.fsum``). The numbers therefore do not depend on how the problems
were split over ranks: two ranks log bit for bit what one rank logs on the same samples."""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch.distributed as dist

from espo_lightning.evaluation.sets import EvalSpec


@dataclass(frozen=True)
class ProblemResult:
    """The outcome of one problem's n completions (weight 0: a rank's padding repeat, not counted)."""

    set_name: str
    index: int  # position of the problem in its set
    weight: float
    n: int  # completions
    correct: int  # completions the accuracy reward calls correct
    length_sum: int  # generated tokens over the n completions (EOS included)
    truncated: int  # completions that hit max_new_tokens


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021, the
    Codex paper): the probability that k samples drawn without replacement from the n hold at least
    one correct one, ``1 - C(n - c, k) / C(n, k)``. Computed as the product
    ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (the paper's numerically stable form: no huge
    binomials)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def set_metrics(spec: EvalSpec, results: list[ProblemResult]) -> dict[str, float]:
    """The set's logged metrics from its problems' results (weight-0 padding left out)."""
    real = sorted((r for r in results if r.weight > 0), key=lambda r: r.index)
    samples = sum(r.n for r in real)
    if not real or samples == 0:
        return {}
    p = spec.prefix
    out = {}
    if spec.greedy:
        out[p + "accuracy"] = math.fsum(r.correct for r in real) / samples
    else:
        out[p + f"avg@{spec.k}"] = math.fsum(r.correct for r in real) / samples
        for k in spec.pass_at_k:
            out[p + f"pass@{k}"] = math.fsum(pass_at_k(r.n, r.correct, k) for r in real) / len(real)
    out[p + "response_len_mean"] = math.fsum(r.length_sum for r in real) / samples
    out[p + "truncated_frac"] = math.fsum(r.truncated for r in real) / samples
    return out


def gather_results(results: list[ProblemResult]) -> list[ProblemResult]:
    """Every rank's results on every rank (one ``all_gather_object``), in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(results)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [astuple(r) for r in results])
    return [ProblemResult(*row) for part in parts for row in part]
