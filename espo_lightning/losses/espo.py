"""ESPO: Entropy Importance Sampling Policy Optimization (arXiv 2512.00499; DESIGN section 2).

Each response's valid tokens are split into entropy groups (``grouping.py``). Group g of response i
gets one importance ratio ``s_g = exp(mean_{t in g}(logp - old_logp))`` (detached, log clamped to
[-20, 20]) used on its tokens in the GSPO-token form ``log s_{g,t} = sg(log s_g) + logp_t - sg(logp_t)``,
and its own clip width ``eps_g = alpha * mean_{t in g} H_t / log V`` (eq. 8). The loss is the mean
over responses of the mean over their non-empty groups of the group's mean of
``l_t = -min(s A, clip(s, 1 - eps, 1 + eps) A)``, i.e. ``sum_t w_t l_t`` with token weights
``w_t = 1 / (|g| * groups_i * responses)``.

Two implementation choices keep this as cheap as GSPO (``benchmarks/loss_speed.py``):

- Group quantities live in a *slot table* ``[B, G + 1]``: column ``1 + g`` is group g of a response
  (G = the mode's groups per response), column 0 collects its invalid tokens (group id -1), so the
  flat slot index is one add. Group sums are one ``scatter_add``, per-token values one
  ``index_select``: no Python loop over responses or groups.
- The loss is assembled as ``value + sum_t c_t * (logp_t - sg(logp_t))`` with ``c_t = d l_t w_t / d logp_t``
  computed in closed form (``-A s_g w_t`` if the clip does not bind, else 0). Its value and gradient
  are exactly those of the expression above, but autograd only records one multiply. When each
  response has one advantage, every token of a group shares s_g, eps_g and A, so the clip decision,
  the loss value and the metrics are computed per group rather than per token.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from espo_lightning.losses.base import (
    MAX_LOG_RATIO,
    LossInputs,
    Normalizer,
    PolicyLoss,
    canonical_inputs,
    check_range,
    denominators,
    policy_metrics,
)
from espo_lightning.losses.grouping import (
    GROUPING_MODES,
    RANKED_MODES,
    GroupingMode,
    GroupingScope,
    assign_entropy_groups,
    num_group_slots,
)
from espo_lightning.losses.kl import KLEstimator


class _SlotLayout:
    """Maps tokens ``[B, T]`` to the slot table ``[B, W]`` (W = groups per response + 1)."""

    def __init__(self, group_ids: Tensor, width: int) -> None:
        batch = group_ids.shape[0]
        row_start = torch.arange(batch, device=group_ids.device).unsqueeze(-1) * width + 1  # [B, 1]
        self.slot = (row_start + group_ids).reshape(-1)  # [B*T]; id -1 lands in the row's column 0
        self.token_shape = group_ids.shape
        self.table_shape = (batch, width)

    def sum(self, values: Tensor) -> Tensor:
        """Per-slot sums ``[B, W]`` of token values ``[B, T]``."""
        out = torch.zeros(self.table_shape[0] * self.table_shape[1], dtype=values.dtype, device=values.device)
        return out.scatter_add_(0, self.slot, values.reshape(-1)).view(self.table_shape)

    def gather(self, table: Tensor) -> Tensor:
        """Each token's slot value ``[B, T]`` from a table ``[B, W]``."""
        return table.reshape(-1).index_select(0, self.slot).view(self.token_shape)


class _GroupTable(NamedTuple):
    """Per-group quantities ``[B, W]``; column 0 (invalid tokens) has count 0 and weight 0."""

    count: Tensor  # valid tokens in the group
    log_ratio: Tensor  # clamped mean log-ratio log s_g (detached)
    entropy_sum: Tensor  # sum of old-policy entropies (zeros when entropies were not given)
    weight: Tensor  # token weight 1 / (|g| * groups_i * responses); 0 for empty groups
    eps: Tensor | None  # adaptive clip width eps_g; None with fixed epsilons


class _Units(NamedTuple):
    """What the clip decides on, ``[B, X]``: groups (X = W) when each response has one advantage,
    else tokens (X = T)."""

    ratio: Tensor  # s_g of the unit
    eps: Tensor | None  # adaptive eps_g of the unit
    weight: Tensor  # loss weight of one token of the unit
    count: Tensor  # valid tokens the unit stands for
    adv: Tensor  # [B, 1] or [B, X]


class ESPOLoss(PolicyLoss):
    """ESPO with entropy grouping and entropy-adaptive clipping (the paper's defaults)."""

    needs_entropies = True

    def __init__(
        self,
        alpha: float = 0.02,
        grouping: GroupingMode = "top_fraction",
        high_entropy_fraction: float = 0.2,
        num_groups: int = 2,
        thresholds: list[float] | None = None,
        adaptive_clip: bool = True,
        epsilon_low: float = 3e-4,
        epsilon_high: float = 4e-4,
        epsilon_min: float | None = None,
        epsilon_max: float | None = None,
        vocab_size: int | None = None,
        scope: GroupingScope = "response",
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        """
        Args:
            alpha: scale of the entropy-adaptive clip width eps_g = alpha * mean entropy / log(V)
                (paper eq. 8); > 0.
            grouping: how a response's tokens are grouped by old-policy entropy: "top_fraction"
                (the ceil(rho * n) highest-entropy tokens vs the rest), "quantile" (num_groups
                equal-count entropy bins), "threshold" (fixed cut points in nats), "token" (every
                token its own group) or "sequence" (one group per response, GSPO-like).
            high_entropy_fraction: rho of "top_fraction", the share of tokens in the high-entropy
                group; in (0, 1].
            num_groups: number of bins of "quantile"; >= 1.
            thresholds: ascending entropy cut points in nats for "threshold"; a token goes to the
                bin of the number of cut points its entropy reaches (group 0 = highest bin).
            adaptive_clip: use the entropy-adaptive eps_g; False uses the fixed epsilon_low /
                epsilon_high (the paper's "no adaptive clipping" ablations).
            epsilon_low: fixed lower clip width (ratio clipped at 1 - epsilon_low) when
                adaptive_clip is False; in [0, 1].
            epsilon_high: fixed upper clip width (ratio clipped at 1 + epsilon_high) when
                adaptive_clip is False; >= 0.
            epsilon_min: optional lower bound on the adaptive eps_g; >= 0.
            epsilon_max: optional upper bound on the adaptive eps_g; > 0 and >= epsilon_min.
            vocab_size: vocabulary size V for log(V); None lets the trainer set it from the model
                (set_vocab_size). >= 2.
            scope: "response" ranks entropies within each response (the paper); "batch" ranks
                them over all valid tokens of the minibatch (top_fraction and quantile only).
            beta: weight of the KL penalty to the reference policy (0 = off); >= 0.
            kl_estimator: KL estimator, "k1", "k2" or "k3".
        """
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        name = "ESPOLoss"
        check_range(name, "alpha", alpha, 0.0, low_open=True)
        if grouping not in GROUPING_MODES:
            raise ValueError(f"{name}: grouping must be one of {GROUPING_MODES}, got {grouping!r}")
        check_range(name, "high_entropy_fraction", high_entropy_fraction, 0.0, 1.0, low_open=True)
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
            raise ValueError(f"{name}: num_groups must be an integer >= 1, got {num_groups!r}")
        if grouping == "threshold":
            if not thresholds:
                raise ValueError(f"{name}: grouping='threshold' needs a non-empty ascending list of thresholds (nats)")
            for value in thresholds:
                check_range(name, "thresholds[*]", value)
            if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
                raise ValueError(f"{name}: thresholds must be strictly ascending, got {list(thresholds)}")
        check_range(name, "epsilon_low", epsilon_low, 0.0, 1.0)
        check_range(name, "epsilon_high", epsilon_high, 0.0)
        if epsilon_min is not None:
            check_range(name, "epsilon_min", epsilon_min, 0.0)
        if epsilon_max is not None:
            check_range(name, "epsilon_max", epsilon_max, epsilon_min or 0.0, low_open=epsilon_min is None)
        if vocab_size is not None:
            self._check_vocab_size(vocab_size)
        if scope not in ("response", "batch"):
            raise ValueError(f"{name}: scope must be 'response' or 'batch', got {scope!r}")
        if scope == "batch" and grouping not in RANKED_MODES:
            raise ValueError(f"{name}: scope='batch' applies to grouping in {RANKED_MODES}, got grouping={grouping!r}")
        self.alpha = float(alpha)
        self.grouping = grouping
        self.high_entropy_fraction = float(high_entropy_fraction)
        self.num_groups = num_groups
        self.thresholds: list[float] | None = [float(v) for v in thresholds] if thresholds else None
        self.adaptive_clip = bool(adaptive_clip)
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.epsilon_min = None if epsilon_min is None else float(epsilon_min)
        self.epsilon_max = None if epsilon_max is None else float(epsilon_max)
        self.vocab_size = vocab_size
        self.scope = scope

    @staticmethod
    def _check_vocab_size(v: int) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ValueError(f"ESPOLoss: vocab_size must be an integer >= 2, got {v!r}")

    def set_vocab_size(self, v: int) -> None:
        self._check_vocab_size(v)
        self.vocab_size = int(v)

    def num_slots_per_response(self, seq_len: int) -> int:
        return num_group_slots(self.grouping, seq_len, self.num_groups, self.thresholds)

    @property
    def prepares_per_response(self) -> bool:
        return self.scope == "response"  # "batch" ranks entropies over all of the rollout's rows

    def prepare(self, entropies: Tensor | None, mask: Tensor) -> Tensor:
        """Entropy group ids ``[B, T]`` (long; 0 = highest-entropy group, -1 on invalid tokens).

        The old policy's entropies do not change during the updates of one rollout, so the trainer
        calls this once per rollout and passes the result to every ``forward`` as ``group_ids``."""
        return assign_entropy_groups(
            entropies, mask, self.grouping,
            high_entropy_fraction=self.high_entropy_fraction, num_groups=self.num_groups,
            thresholds=self.thresholds, scope=self.scope,
        )

    @torch.no_grad()
    def _group_table(self, x: LossInputs, ent: Tensor | None, layout: _SlotLayout,
                     normalizer: Normalizer | None) -> _GroupTable:
        count = layout.sum(x.maskf)  # [B, W]
        per_group = count.clamp_min(1)
        log_ratio = layout.sum(x.logp.detach() - x.old_logp) / per_group  # [B, W], padding is 0
        log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        entropy_sum = layout.sum(ent) if ent is not None else torch.zeros_like(count)
        nonempty = count > 0  # [B, W]
        groups_i = nonempty.sum(-1, keepdim=True).to(count.dtype)  # [B, 1] non-empty groups per response
        responses, _ = denominators(x, normalizer)
        weight = torch.where(nonempty, 1.0 / (per_group * groups_i.clamp_min(1) * responses), 0.0)
        eps = None
        if self.adaptive_clip:
            eps = self.alpha * (entropy_sum / per_group) / math.log(self.vocab_size)  # [B, W]
            if self.epsilon_min is not None or self.epsilon_max is not None:
                eps = eps.clamp(self.epsilon_min, self.epsilon_max)
        return _GroupTable(count, log_ratio, entropy_sum, weight, eps)

    def forward(
        self,
        *,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        entropies: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        group_ids: Tensor | None = None,
        normalizer: Normalizer | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = canonical_inputs("ESPOLoss", logprobs, old_logprobs, advantages, mask)
        ent = None if entropies is None else torch.where(x.mask, entropies.detach().to(x.logp.dtype), 0.0)
        if self.adaptive_clip:
            if ent is None:
                raise ValueError("ESPOLoss: adaptive_clip=True needs the old policy's entropies, got None")
            if self.vocab_size is None:
                raise RuntimeError("ESPOLoss: vocab_size is unknown; pass vocab_size= or call set_vocab_size(V)")
        if group_ids is None:
            group_ids = self.prepare(ent, x.mask)
        elif group_ids.shape != x.mask.shape:
            raise ValueError(f"ESPOLoss: group_ids {tuple(group_ids.shape)} must match mask {tuple(x.mask.shape)}")
        layout = _SlotLayout(group_ids, self.num_slots_per_response(x.mask.shape[1]) + 1)
        table = self._group_table(x, ent, layout, normalizer)

        with torch.no_grad():
            units, to_tokens, to_groups = self._units(table, x, layout)
            if units.eps is None:
                # 0-d tensors in the loss dtype (new_full fills on the device: no host-to-device copy)
                low = units.ratio.new_full((), 1.0 - self.epsilon_low)
                high = units.ratio.new_full((), 1.0 + self.epsilon_high)
            else:
                low, high = 1.0 - units.eps, 1.0 + units.eps
            clipped_low = (units.ratio < low) & (units.adv < 0)  # [B, X] the clip zeroes the gradient
            clipped_high = (units.ratio > high) & (units.adv > 0)
            clipped = clipped_low | clipped_high
            # -min(s A, clip(s) A) is -A * bound where the clip binds, -A * s elsewhere.
            term = -units.adv * torch.where(clipped, torch.where(units.adv > 0, high, low), units.ratio)  # [B, X]
            value = (term * units.weight * units.count).sum()
            grad_coef = torch.where(clipped, 0.0, -units.adv * units.ratio * units.weight)  # [B, X] dloss/dlogp_t
            token_coef = to_tokens(grad_coef)  # [B, T]
        loss = value + (token_coef * (x.logp - x.logp.detach())).sum()

        with torch.no_grad():
            active = (units.adv != 0) & ~clipped
            valid = units.count > 0
            metrics = policy_metrics(units.ratio * valid, clipped_low, clipped_high, active, units.count)
            metrics.update(self._group_metrics(table, to_groups(clipped * units.count)))
        if self.needs_reference:
            token_weight = to_tokens(units.weight) * x.maskf  # [B, T]
            kl_loss, kl_metrics = self.kl_penalty(x.logp, ref_logprobs, x.mask, token_weight)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics

    @staticmethod
    def _units(
        table: _GroupTable, x: LossInputs, layout: _SlotLayout
    ) -> tuple[_Units, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The units the clip decides on, and maps of unit values to tokens ``[B, T]`` / groups ``[B, W]``."""
        ratio = table.log_ratio.exp()  # [B, W]
        if x.adv.shape[-1] == 1:  # one advantage per response: decide per group
            units = _Units(ratio, table.eps, table.weight, table.count, x.adv)
            return units, layout.gather, lambda values: values
        eps = None if table.eps is None else layout.gather(table.eps)
        units = _Units(layout.gather(ratio), eps, layout.gather(table.weight) * x.maskf, x.maskf, x.adv)
        return units, lambda values: values, layout.sum

    def _group_metrics(self, table: _GroupTable, clipped_count: Tensor) -> dict[str, Tensor]:
        """``entropy_group/<k>/*`` for the modes with a fixed number of groups, and ``clip/sequence``
        for the sequence mode. Token-weighted within group k across the minibatch; 0 for an empty
        group. ``clipped_count`` ``[B, W]``: clipped tokens per group."""
        if self.grouping == "token":
            return {}
        count = table.count[:, 1:]  # [B, K] without the invalid-token column
        clipped_count = clipped_count[:, 1:]
        dtype = count.dtype
        out: dict[str, Tensor] = {}
        if self.grouping == "sequence":
            responses = (count.squeeze(-1) > 0).sum().to(dtype)
            out["clip/sequence"] = (clipped_count.squeeze(-1) > 0).sum().to(dtype) / responses.clamp_min(1)
        count_k = count.sum(0)  # [K]
        per_k = count_k.clamp_min(1)
        if table.eps is None:
            eps_k = (count_k > 0).to(dtype) * (0.5 * (self.epsilon_low + self.epsilon_high))  # mean half-width
        else:
            eps_k = (table.eps[:, 1:] * count).sum(0) / per_k
        columns = {
            "size_frac": count_k / count_k.sum().clamp_min(1),
            "entropy_mean": table.entropy_sum[:, 1:].sum(0) / per_k,
            "epsilon_mean": eps_k,
            "clip_frac": clipped_count.sum(0) / per_k,
            "ratio_mean": (table.log_ratio[:, 1:].exp() * count).sum(0) / per_k,
        }
        for key, values in columns.items():
            out.update({f"entropy_group/{k}/{key}": values[k] for k in range(len(count_k))})
        return out
