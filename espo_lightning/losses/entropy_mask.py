"""Training on the high-entropy minority of tokens ("Beyond the 80/20 Rule", arXiv 2506.01939; TRL's
``top_entropy_quantile``), as a wrapper around any policy loss.

Only the valid tokens whose old-policy entropy is at or above the ``1 - top_entropy_quantile``
quantile (linear interpolation, as ``torch.quantile`` and TRL) of the entropies of *all valid tokens
of the minibatch on all ranks* carry policy gradient. The threshold is taken once per optimizer step
over the whole minibatch (``prepare_minibatch``), so micro-batches and ranks do not move it; TRL
takes it per forward batch, gathered over processes.

How the mask acts: the wrapped loss is called with the advantage set to 0 on the masked tokens.
For every token-level loss (GRPO/DAPO, CISPO, SAPO, Clip-Cov, KL-Cov) that zeroes exactly those
tokens' policy terms, as TRL's ``per_token_loss * entropy_mask`` does, while **the normaliser stays
the wrapped loss's own**: all valid tokens of the minibatch (token_mean) or of each response
(seq_mean_token_mean) still count in the denominators, as in TRL, so the loss is the masked sum
divided by the unmasked counts (not a mean over the kept tokens). KL-Cov's penalty is also dropped on
masked tokens (its choice is narrowed to the kept ones); a KL penalty to the reference model
(``beta``) still covers every token, as in TRL. With a sequence-level ratio (GSPO, ESPO) the masked
tokens still enter each response's ratio; only their own terms are zeroed.

The clip and utilisation metrics are the wrapped loss's: a masked token has A = 0 there, so it is
neither clipped nor active. ``entropy_mask/kept`` is the fraction of valid tokens kept.
"""
from __future__ import annotations

import torch
from torch import Tensor

from espo_lightning.losses.base import Normalizer, PolicyLoss, check_range
from espo_lightning.losses.selection import distributed_default, high_entropy_tokens


def pack(keep: Tensor, inner_ids: Tensor | None) -> Tensor:
    """One long ``[B, T]`` carrying the kept tokens (bit 0) and the wrapped loss's ``group_ids``
    (>= -1, e.g. ESPO's groups; zeros when it has none) through the trainer's ``group_ids`` slot."""
    inner = torch.zeros_like(keep, dtype=torch.long) if inner_ids is None else inner_ids.long()
    return (inner + 1) * 2 + keep.long()


def unpack(packed: Tensor) -> tuple[Tensor, Tensor]:
    """``(keep [B, T] bool, inner group_ids [B, T] long)`` of ``pack``."""
    return (packed & 1).bool(), torch.div(packed, 2, rounding_mode="floor") - 1


class HighEntropyMaskLoss(PolicyLoss):
    """Any policy loss, with policy gradient only on the top ``top_entropy_quantile`` of the
    minibatch's tokens by old-policy entropy."""

    needs_entropies = True

    def __init__(self, loss: PolicyLoss, top_entropy_quantile: float = 0.2) -> None:
        """
        Args:
            loss: the wrapped policy loss (``espo_lightning.losses.GRPOLoss``, ``SAPOLoss``, ...);
                its own hyperparameters, normaliser and KL penalty apply.
            top_entropy_quantile: rho, the share of the minibatch's valid tokens (by old-policy
                entropy, highest first) that carry gradient; in (0, 1]. 0.2 is the paper's 20%;
                1.0 keeps every token.
        """
        super().__init__()
        if not isinstance(loss, PolicyLoss) or isinstance(loss, HighEntropyMaskLoss):
            raise ValueError(f"HighEntropyMaskLoss: loss must be a policy loss (not another mask), got {loss!r}")
        check_range("HighEntropyMaskLoss", "top_entropy_quantile", top_entropy_quantile, 0.0, 1.0, low_open=True)
        self.loss = loss
        self.top_entropy_quantile = float(top_entropy_quantile)

    # ----- the wrapped loss's settings ---------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return self.loss.needs_reference

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.loss, "vocab_size", 1)

    def set_vocab_size(self, v: int) -> None:
        self.loss.set_vocab_size(v)

    @property
    def prepares_per_response(self) -> bool:
        return False  # the threshold needs every row's entropies before the step

    def prepare(self, entropies: Tensor, mask: Tensor) -> Tensor | None:
        return self.loss.prepare(entropies, mask)

    # ----- the mask -----------------------------------------------------------------------------
    def prepare_minibatch(self, *, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                          entropies: Tensor | None = None, group_ids: Tensor | None = None, step: int = 0,
                          distributed: bool | None = None) -> Tensor:
        distributed = distributed_default() if distributed is None else distributed
        if entropies is None:
            raise ValueError("HighEntropyMaskLoss: needs the old policy's entropies, got None")
        mask = mask.bool()
        inner = self.loss.prepare_minibatch(old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                                            entropies=entropies, group_ids=group_ids, step=step,
                                            distributed=distributed)
        keep = high_entropy_tokens(entropies, mask, self.top_entropy_quantile, distributed)
        return pack(keep, inner)

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
        mask = mask.bool()
        if group_ids is None:  # these rows are the whole minibatch
            group_ids = self.prepare_minibatch(
                old_logprobs=old_logprobs, advantages=advantages, mask=mask, entropies=entropies,
                group_ids=self.loss.prepare(entropies, mask) if entropies is not None else None,
                distributed=False)
        elif group_ids.shape != mask.shape:
            raise ValueError(f"HighEntropyMaskLoss: group_ids {tuple(group_ids.shape)} must match mask "
                             f"{tuple(mask.shape)}")
        keep, inner_ids = unpack(group_ids)
        keep = keep & mask
        if getattr(self.loss, "group_ids_select_tokens", False):
            inner_ids = inner_ids * keep  # KL-Cov / Clip-Cov: no chosen token outside the mask
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)
        masked_adv = torch.where(keep, advantages.detach(), 0.0)  # [B, T]
        loss, metrics = self.loss(
            logprobs=logprobs, old_logprobs=old_logprobs, advantages=masked_adv, mask=mask,
            entropies=entropies, ref_logprobs=ref_logprobs, group_ids=inner_ids, normalizer=normalizer)
        with torch.no_grad():
            metrics["entropy_mask/kept"] = keep.sum().to(loss.dtype) / mask.sum().clamp_min(1).to(loss.dtype)
        return loss, metrics
