"""Entropy groups computed by a plain loop straight from DESIGN section 2 ("Entropy groups"): no
code of ``espo_lightning.losses.grouping``, so the loss's own grouping (``prepare`` and the one
``forward`` does without ``group_ids``) can be checked against it."""
from __future__ import annotations

import math

import torch


def _ranked(ent: torch.Tensor, positions: list) -> dict:
    """Rank (0 = highest entropy) of each position; ties go to the earlier position."""
    order = sorted(positions, key=lambda p: (-float(ent[p]), p))
    return {p: r for r, p in enumerate(order)}


def _high_count(n: int, rho: float) -> int:
    """ceil(rho * n), at least one token of a non-empty response (round() absorbs 0.1 * 30 = 3.0000000000000004)."""
    return 0 if n == 0 else min(n, max(1, math.ceil(round(rho * n, 9))))


def reference_groups(ent: torch.Tensor, mask: torch.Tensor, grouping: str = "top_fraction",
                     high_entropy_fraction: float = 0.2, num_groups: int = 2, thresholds=(),
                     scope: str = "response") -> torch.Tensor:
    B, T = mask.shape
    out = torch.full((B, T), -1, dtype=torch.long)
    if scope == "batch" and grouping in ("top_fraction", "quantile"):
        units = [[(i, t) for i in range(B) for t in range(T) if mask[i, t]]]
    else:
        units = [[(i, t) for t in range(T) if mask[i, t]] for i in range(B)]
    for unit in units:
        n = len(unit)
        ranks = _ranked(ent, unit)
        for p in unit:
            if grouping == "top_fraction":
                out[p] = 0 if ranks[p] < _high_count(n, high_entropy_fraction) else 1
            elif grouping == "quantile":
                out[p] = min(num_groups - 1, ranks[p] * num_groups // n)
            elif grouping == "threshold":
                cuts = [float(torch.tensor(c, dtype=ent.dtype)) for c in thresholds]
                out[p] = len(cuts) - sum(float(ent[p]) >= c for c in cuts)
            elif grouping == "token":
                out[p] = p[1]
            elif grouping == "sequence":
                out[p] = 0
            else:
                raise ValueError(grouping)
    return out
