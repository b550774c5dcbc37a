"""How the token-level losses (SAPO, Clip-Cov, KL-Cov) turn per-token terms into one loss.

``loss = sum_t w_t l_t`` with token weights ``w`` ``[B, T]`` (0 off-mask) divided by the *minibatch's*
counts when a ``Normalizer`` is given, so that micro-batch losses add up to the one-pass loss
(DESIGN section 3). The same two aggregations as ``GRPOLoss``."""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from espo_lightning.losses.base import LossInputs, Normalizer, denominators

LossAggregation = Literal["seq_mean_token_mean", "token_mean"]
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def check_aggregation(owner: str, value: str) -> None:
    if value not in AGGREGATIONS:
        raise ValueError(f"{owner}: loss_aggregation must be one of {AGGREGATIONS}, got {value!r}")


def token_weights(x: LossInputs, normalizer: Normalizer | None, aggregation: LossAggregation) -> Tensor:
    """``w_t`` ``[B, T]``: ``1 / valid tokens`` (token_mean, DAPO's) or ``1 / (n_i * responses)``
    (seq_mean_token_mean, GRPO's); 0 off-mask."""
    n_seqs, n_tokens = denominators(x, normalizer)
    if aggregation == "token_mean":
        return x.maskf / n_tokens
    return x.maskf / (x.maskf.sum(-1, keepdim=True).clamp_min(1) * n_seqs)
