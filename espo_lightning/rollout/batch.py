"""The typed rollout minibatch that flows from the rollout DataModule into ``training_step``.

Shapes: B responses, L = Lp + Lc tokens of prompt (left padded to Lp) followed by completion
(right padded to Lc). Completion-level tensors are ``[B, Lc]`` and aligned so that position t
scores token ``input_ids[:, Lp + t]``."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] long, prompt (left padded) + completion (right padded)
    attention_mask: torch.Tensor  # [B, L] long, 1 on real tokens
    completion_mask: torch.Tensor  # [B, Lc] bool, valid completion tokens that enter the loss
    old_logprobs: torch.Tensor  # [B, Lc] float32, old policy log-prob of each sampled token
    entropies: torch.Tensor  # [B, Lc] float32, old policy entropy (nats) at each position
    advantages: torch.Tensor  # [B] float32
    rewards: torch.Tensor  # [B] float32, NaN where the verifier could not score
    ref_logprobs: torch.Tensor | None = None  # [B, Lc], only when the loss has a KL term
    group_ids: torch.Tensor | None = None  # [B, Lc] long, entropy group per token (ESPO), -1 off-mask
    engine_logprobs: torch.Tensor | None = None  # [B, Lc], the rollout engine's own log-probs
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    # [B] bool: rows not scored yet; the first (on-policy) update fills their old log-probs,
    # entropies and group ids from its own forward pass (PolicyModule.score_rollout, training_step)
    unscored: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        """Rows ``index`` of every tensor field (None fields stay None)."""
        return replace(self, **{f.name: _take(getattr(self, f.name), index) for f in fields(self)})

    def to(self, device) -> "RolloutBatch":
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def trimmed(self) -> "RolloutBatch":
        """Drop prompt columns that are padding in every row and completion columns past the longest
        completion, so a minibatch of short responses does not pay for the rollout's longest one."""
        lp = self.prompt_length
        prompt_real = self.attention_mask[:, :lp].any(dim=0)
        completion_real = self.attention_mask[:, lp:].any(dim=0)
        first = int(prompt_real.float().argmax()) if bool(prompt_real.any()) else lp
        last = int(completion_real.nonzero().max()) + 1 if bool(completion_real.any()) else 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or v.dim() < 2:
                out[f.name] = v
            elif f.name in ("input_ids", "attention_mask"):
                out[f.name] = torch.cat([v[:, first:lp], v[:, lp : lp + last]], dim=1)
            else:
                out[f.name] = v[:, :last]
        return replace(self, **out)


def _take(value, index):
    return value[index] if isinstance(value, torch.Tensor) else value


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


class ServedBatch:
    """A minibatch as the DataLoader hands it to Lightning.

    Under ``trainer.precision: bf16-true`` (or ``16-true``) Lightning casts every floating tensor of
    a batch collection, dataclasses included, to half precision before ``training_step``. Old
    log-probs, entropies and advantages must stay fp32: bf16 keeps 8 mantissa bits, so a log-prob
    of -5 would be rounded by up to 0.016, far more than ESPO's clip range (1e-4 to 1e-3). Lightning leaves this plain holder alone; the
    rollout is already on the module's device, so there is nothing for it to move either."""

    __slots__ = ("batch",)

    def __init__(self, batch: RolloutBatch) -> None:
        self.batch = batch


def unwrap(batch) -> RolloutBatch:
    """The ``RolloutBatch`` of a served minibatch (or the batch itself)."""
    return batch.batch if isinstance(batch, ServedBatch) else batch
