"""The old policy's statistics of a rollout: log-probs of the sampled tokens, entropies, reference
log-probs and ESPO's entropy groups, computed once per rollout before its updates.

Two ways, with the same numbers bit for bit:

- ``score_rollout``: a no-grad pass over each minibatch in the micro-batches ``training_step`` will
  cut from it, under the same precision context and in train mode, so the first on-policy update
  computes bit-identical log-probs (ratio exactly 1), which it would not if the shapes differed.
- The first update scores its own rows (``defer_first``): it runs on the weights that generated the
  rollout, so the forward pass it makes for its loss gives exactly those log-probs, and the entropies
  come from the same chunks of logits. The scoring pass skips that minibatch (``RolloutBatch.unscored``
  marks its rows) and ``training_step`` fills them in with ``fill_old_policy``."""
from __future__ import annotations

import torch

from espo_lightning.training.micro_batches import is_every_row
from espo_lightning.rollout.batch import RolloutBatch


@torch.no_grad()
def score_rollout(module, batch: RolloutBatch, minibatches: list[torch.Tensor] | None = None,
                  defer_first: bool = False) -> RolloutBatch:
    """Fill in ``batch``'s old log-probs, entropies, reference log-probs and entropy groups with
    ``module``'s policy (and reference).

    ``minibatches``: the row indices of the first pass's minibatches (default: one of all rows).
    ``defer_first``: leave the policy's statistics of the first minibatch to the first update (its
    rows are marked ``batch.unscored``); with one minibatch per rollout there is then no policy pass
    here at all. Ignored for a loss whose ``prepare`` ranks across responses (it needs every row)."""
    minibatches = [torch.arange(len(batch))] if minibatches is None else minibatches
    defer = defer_first and module.loss_fn.prepares_per_response
    old = torch.zeros(batch.completion_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    entropies, ref = torch.zeros_like(old), (torch.zeros_like(old) if module.reference is not None else None)
    with module.precision_context():
        for k, rows in enumerate(minibatches):
            score_policy = not (defer and k == 0)
            if not score_policy and ref is None:
                continue
            rows = rows.to(batch.input_ids.device)
            minibatch = batch.select(rows).trimmed()
            for micro_rows in module.micro_batches(minibatch):
                # one micro-batch of every row in order (no limits) is the trimmed minibatch itself
                micro = (minibatch if is_every_row(micro_rows, len(minibatch))
                         else minibatch.select(micro_rows.to(rows.device)).trimmed())
                target, width = rows[micro_rows.to(rows.device)], micro.completion_mask.shape[1]
                if score_policy:
                    lp, ent = module.scorer.logprobs_and_entropy(module.policy, micro)
                    old[target, :width], entropies[target, :width] = lp, ent
                if ref is not None:
                    ref[target, :width] = module.scorer.logprobs_and_entropy(module.reference, micro)[0]
    batch.old_logprobs, batch.entropies, batch.ref_logprobs = old, entropies, ref
    batch.group_ids = module.loss_fn.prepare(batch.entropies, batch.completion_mask)
    batch.unscored = None
    if defer and minibatches:
        batch.unscored = torch.zeros(len(batch), dtype=torch.bool, device=old.device)
        batch.unscored[minibatches[0].to(old.device)] = True
    return batch


def is_unscored(batch: RolloutBatch) -> bool:
    """Whether this minibatch is the deferred first one: every row unscored. A minibatch holding only
    some unscored rows would train on old log-probs of zero, so it is refused."""
    if batch.unscored is None:
        return False
    if not bool(batch.unscored.all()):
        raise RuntimeError("a minibatch mixes rows scored at rollout time with rows left to the first "
                           "update (RolloutBatch.unscored); only the first minibatch may be deferred")
    return True


def fill_old_policy(loss_fn, batch: RolloutBatch, rows: torch.Tensor, micro: RolloutBatch, logp: torch.Tensor,
                    entropies: torch.Tensor, write: bool) -> None:
    """The first update's own pass over ``micro`` (rows ``rows`` of ``batch``) gives the old policy's
    log-probs (``logp``, detached) and entropies; the entropy groups follow from them. Written into
    ``micro`` for its loss and, unless it is a padding pass, into ``batch`` for the step's
    diagnostics and the callbacks."""
    micro.old_logprobs, micro.entropies = logp, entropies
    micro.group_ids = loss_fn.prepare(entropies, micro.completion_mask)
    if not write:
        return
    width = logp.shape[1]
    batch.old_logprobs[rows, :width], batch.entropies[rows, :width] = logp, entropies
    if micro.group_ids is not None:
        batch.group_ids[rows, :width] = micro.group_ids
