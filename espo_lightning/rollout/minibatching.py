"""How a rollout is served: its rows cut into minibatches, one optimizer step each, for every pass.

The cut is a seeded shuffle per pass, a pure function of (rows, epoch, seed): the rollout's scoring
reads the first pass's minibatches before they are served (the first one scores itself,
``espo_lightning.training.old_policy``), and a resumed run must cut the same ones again."""
from __future__ import annotations

import math

import torch

from espo_lightning.rollout.batch import RolloutBatch


def count(rows_per_rank: int, minibatch_size: int | None) -> int:
    """Minibatches per pass: one without ``minibatch_size``, else ``ceil(rows / minibatch_size)``."""
    return 1 if minibatch_size is None else max(1, math.ceil(rows_per_rank / minibatch_size))


def indices(rows: int, n: int, passes: int, seed: int, epoch: int) -> list[list[torch.Tensor]]:
    """Row indices of the ``n`` minibatches of each of ``passes`` passes over ``rows`` rows."""
    gen = torch.Generator().manual_seed(seed * 31 + epoch)
    return [list(torch.tensor_split(torch.randperm(rows, generator=gen), n)) for _ in range(passes)]


def serve(batch: RolloutBatch, passes: list[list[torch.Tensor]]) -> list[RolloutBatch]:
    """The minibatches in serving order, each trimmed to its own widths."""
    device = batch.input_ids.device
    return only_deferred_marked([batch.select(idx.to(device)).trimmed() for one_pass in passes for idx in one_pass])


def only_deferred_marked(minibatches: list[RolloutBatch]) -> list[RolloutBatch]:
    """The served minibatches, with the ``unscored`` marker kept only on the one holding deferred
    rows: checked once per rollout here, so ``training_step`` reads ``None`` without a host sync."""
    for b in minibatches:
        if b.unscored is not None and not bool(b.unscored.any()):
            b.unscored = None
    return minibatches
