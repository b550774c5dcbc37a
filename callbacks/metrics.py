"""Two small torchmetrics ``Metric`` classes for diagnostics: ``HistogramSketch`` (the entropy and
advantage histograms of ``EntropyGroupMonitor`` and ``example_custom``) and ``WeightedMean`` (for
custom callbacks that keep their own torchmetrics state; ``DiagnosticsCallback`` packs its scalar
aggregates into one tensor instead, see ``callbacks/base.py``).

Both keep their state as tensors on the module's device, update without host synchronisation and
are reduced across ranks by torchmetrics (sum / min / max of the states) when ``compute`` is called,
so an epoch value is the same global number on every rank and equals what one rank holding all the
data would compute."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class WeightedMean(Metric):
    """``sum_i w_i v_i / sum_i w_i`` over every update on every rank.

    Used with ``w`` = the number of tokens (or sequences) a per-step value was averaged over, so the
    epoch value is the token-weighted mean over the whole epoch, not a mean of per-step means.
    ``compute`` returns NaN when the total weight is 0; callers check ``isfinite`` and log nothing.

    torchmetrics' ``MeanMetric`` is not used because it checks for NaN with a host synchronisation on
    every update (and its ``nan_strategy="disable"`` drops the weights)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("value_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        value = torch.as_tensor(value).to(device=self.device, dtype=self.value_sum.dtype)
        weight = torch.as_tensor(weight).to(device=self.device, dtype=self.value_sum.dtype)
        self.value_sum += (value * weight).sum()
        self.weight_sum += weight.sum()

    def compute(self) -> Tensor:
        nan = torch.full_like(self.value_sum, float("nan"))
        return torch.where(self.weight_sum > 0, self.value_sum / self.weight_sum.clamp_min(1e-30), nan)


class HistogramSketch(Metric):
    """A fixed-bin histogram of a stream of values over ``[0, upper]`` plus the moments TensorBoard's
    raw histogram needs (count, sum, sum of squares, min, max), summed across ranks.

    Values above ``upper`` land in the last bin (their min/max/sum stay exact), values below 0 in
    the first. Updating costs a few tensor ops on the values' device; nothing is copied to the host.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, bins: int = 64, upper: float = 10.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if bins < 1 or not upper > 0:
            raise ValueError(f"HistogramSketch: need bins >= 1 and upper > 0, got bins={bins}, upper={upper}")
        self.bins, self.upper = int(bins), float(upper)
        self.add_state("counts", default=torch.zeros(self.bins), dist_reduce_fx="sum")
        self.add_state("num", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("low", default=torch.tensor(float("inf")), dist_reduce_fx="min")
        self.add_state("high", default=torch.tensor(float("-inf")), dist_reduce_fx="max")

    def update(self, values: Tensor) -> None:
        x = values.detach().flatten().to(device=self.device, dtype=self.counts.dtype)  # [n]
        if x.numel() == 0:
            return
        index = (x * (self.bins / self.upper)).floor().clamp(0, self.bins - 1).long()  # [n]
        self.counts += torch.bincount(index, minlength=self.bins).to(self.counts.dtype)
        self.num += x.numel()
        self.total += x.sum()
        self.total_sq += (x * x).sum()
        self.low = torch.minimum(self.low, x.min())
        self.high = torch.maximum(self.high, x.max())

    def compute(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "num": self.num, "sum": self.total, "sum_squares": self.total_sq,
                "min": self.low, "max": self.high}

    def bucket_limits(self) -> list[float]:
        """Right edges of the bins (TensorBoard's ``bucket_limits``)."""
        return [self.upper * (i + 1) / self.bins for i in range(self.bins)]
