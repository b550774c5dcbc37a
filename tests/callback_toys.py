"""Toy LightningModule, data and logger for the callback tests: ``training_step`` returns the same
``{"loss", "metrics", "batch"}`` dict as ``PolicyModule``, so every logged number can be checked
against values computed from the same batches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from callbacks import (AdvantageHistogram, ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor,
                       RolloutMonitor, step_batch, step_diagnostics)
from callbacks.metrics import HistogramSketch, WeightedMean
from espo_lightning.rollout.batch import RolloutBatch
from espo_lightning.rollout.stats import RolloutStats

LC = 6  # completion length of every toy batch
EPS = (0.1, 0.2)  # clip epsilon of entropy group 0 (high) and 1 (low)


# ----- toy data -------------------------------------------------------------------------------
def toy_batch(seed: int, rows: int = 8, empty: bool = False) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, LC + 1, (rows,), generator=g)
    lengths[0] = LC  # at least one non-empty response
    if empty:
        lengths[:] = 0
    mask = torch.arange(LC).unsqueeze(0) < lengths.unsqueeze(1)  # [B, Lc]
    old = -torch.rand(rows, LC, generator=g) * 3  # [B, Lc]
    current = old + 0.3 * torch.randn(rows, LC, generator=g)
    ent = torch.rand(rows, LC, generator=g) * math.log(15)
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    rewards[1] = float("nan")  # one response the verifier could not score
    adv = torch.randn(rows, generator=g).round(decimals=1)
    adv[rows // 2:][rewards[rows // 2:] > 0] = 0.0  # some responses without signal
    # top-fraction-like groups: a token is "high" (0) when its entropy is above 0.6 * log V
    groups = torch.where(ent > 0.6 * math.log(15), 0, 1).masked_fill(~mask, -1)
    ids = torch.ones(rows, 3 + LC, dtype=torch.long)
    return RolloutBatch(
        input_ids=ids, attention_mask=torch.cat([torch.ones(rows, 3, dtype=torch.long), mask.long()], 1),
        completion_mask=mask, old_logprobs=old, entropies=ent, advantages=adv, rewards=rewards,
        group_ids=groups, engine_logprobs=current)


def cat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    fields = ("input_ids", "attention_mask", "completion_mask", "old_logprobs", "entropies", "advantages",
              "rewards", "group_ids", "engine_logprobs")
    return RolloutBatch(**{f: torch.cat([getattr(b, f) for b in batches]) for f in fields})


def toy_metrics(b: RolloutBatch, report_sequence_clip: bool = False) -> dict[str, torch.Tensor]:
    """DESIGN section 2's diagnostics of a batch, written out directly."""
    mask = b.completion_mask
    ratio = (b.engine_logprobs - b.old_logprobs).exp()  # [B, Lc]
    adv = b.advantages.unsqueeze(1).expand_as(mask)
    eps = torch.where(b.group_ids == 0, EPS[0], EPS[1])
    low = (ratio < 1 - eps) & (adv < 0) & mask
    high = (ratio > 1 + eps) & (adv > 0) & mask
    active = mask & (adv != 0) & ~(low | high)
    n = mask.sum().float()
    nonempty = mask.any(1)
    seqs = nonempty.sum().float()
    out = {
        "clip/low": low.sum() / n.clamp_min(1), "clip/high": high.sum() / n.clamp_min(1),
        "clip/total": (low | high).sum() / n.clamp_min(1),
        "grad_util/token": active.sum() / n.clamp_min(1),
        "grad_util/sequence": (active.any(1) & nonempty).sum() / seqs.clamp_min(1),
        "ratio/mean": (ratio * mask).sum() / n.clamp_min(1),
        "ratio/max": ratio[mask].max() if mask.any() else torch.tensor(0.0),
        "count/tokens": n, "count/sequences": seqs,
    }
    if report_sequence_clip:
        out["clip/sequence"] = ((low | high).any(1) & nonempty).sum() / seqs.clamp_min(1)
    for k in (0, 1):
        in_k = mask & (b.group_ids == k)
        nk = in_k.sum().float()
        out[f"entropy_group/{k}/size_frac"] = nk / n.clamp_min(1)
        out[f"entropy_group/{k}/entropy_mean"] = (b.entropies * in_k).sum() / nk.clamp_min(1)
        out[f"entropy_group/{k}/epsilon_mean"] = torch.where(nk > 0, EPS[k], 0.0)
        out[f"entropy_group/{k}/clip_frac"] = ((low | high) & in_k).sum() / nk.clamp_min(1)
        out[f"entropy_group/{k}/ratio_mean"] = (ratio * in_k).sum() / nk.clamp_min(1)
    return {k: v.float() for k, v in out.items()}


def toy_loss(b: RolloutBatch) -> torch.Tensor:
    """The scalar S whose gradient w.r.t. the toy's weight w (loss = w * S) is S."""
    mask = b.completion_mask
    ratio = (b.engine_logprobs - b.old_logprobs).exp()
    return -(ratio * b.advantages.unsqueeze(1) * mask).sum() / mask.sum().clamp_min(1)


def toy_rollout(epoch: int, batches: list[RolloutBatch]) -> RolloutStats:
    """Stats that add up over a partition of the batches (so a split across ranks sums to the whole)."""
    full = cat_batches(batches)
    lengths = full.completion_mask.sum(1).float()
    return RolloutStats(
        epoch=epoch, rewards=full.rewards, correct=(full.rewards > 0).float(), response_lengths=lengths,
        truncated=(lengths == LC).float(), zero_std_groups=int((full.advantages == 0).sum()),
        num_groups=len(full), dropped_groups=0,
        generation_time_s=0.5, scoring_time_s=0.25, rollout_time_s=1.0, generated_tokens=int(lengths.sum()),
        engine_logprob_diff=(full.engine_logprobs - full.old_logprobs).abs()[full.completion_mask],
        samples=[{"prompt": "12+3=", "completion": "15", "reward": 1.0},
                 {"prompt": "9+9=", "completion": "17 | x\n```", "reward": None}])


def epoch_batches(epoch: int, steps: int = 3, rank: int = 0, empty: bool = False) -> list[RolloutBatch]:
    return [toy_batch(1000 * epoch + 10 * step + rank, rows=8 - 2 * step, empty=empty) for step in range(steps)]


class ToyData(L.LightningDataModule):
    """Serves ``epoch_batches(epoch)`` and sets ``last_rollout`` like ``RolloutDataModule``.
    ``world`` > 1 on one rank merges every rank's batch i into step i (the 1-process reference)."""

    def __init__(self, steps: int = 3, empty: bool = False, world: int = 1):
        super().__init__()
        self.steps, self.empty, self.world = steps, empty, world
        self.last_rollout = None

    def batches(self, epoch: int) -> list[RolloutBatch]:
        if self.world > 1:  # reference run: all simulated ranks' data on this one rank
            per_rank = [epoch_batches(epoch, self.steps, r, self.empty) for r in range(self.world)]
            return [cat_batches(list(step)) for step in zip(*per_rank)]
        return epoch_batches(epoch, self.steps, self.trainer.global_rank, self.empty)

    def train_dataloader(self):
        batches = self.batches(self.trainer.current_epoch)
        self.last_rollout = toy_rollout(self.trainer.current_epoch, batches)
        return DataLoader(_Items(batches), batch_size=None)


class _Items(IterableDataset):
    """Iterable like ``RolloutDataModule``'s, so Lightning adds no DistributedSampler: the rank's data is ours."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class ToyModule(L.LightningModule):
    def __init__(self, report_sequence_clip: bool = False, lr: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.report_sequence_clip, self.lr = report_sequence_clip, lr
        self.seen: list[RolloutBatch] = []

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        self.seen.append(batch)
        loss = self.weight * toy_loss(batch)
        return {"loss": loss, "metrics": toy_metrics(batch, self.report_sequence_clip), "batch": batch}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: ``history`` is a list of (step, {name: value}); with ``path``
    global rank 0 also writes it there as JSON (to read it back from spawned processes)."""

    def __init__(self, path: str | None = None):
        super().__init__()
        self.history: list[tuple[int, dict[str, float]]] = []
        self.path = path

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.history.append((step, dict(metrics)))
        if self.path is not None and rank_zero_only.rank == 0:
            Path(self.path).write_text(json.dumps(self.history))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.history if name in m]

    def names(self) -> set[str]:
        return {k for _, m in self.history for k in m}


def fit(callbacks, module=None, data=None, epochs: int = 2, logger=None, **trainer_kwargs):
    logger = logger if logger is not None else RecordingLogger()
    module = module if module is not None else ToyModule()
    trainer_kwargs.setdefault("devices", 1)
    trainer_kwargs.setdefault("log_every_n_steps", 1)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1, **trainer_kwargs)
    trainer.fit(module, datamodule=data if data is not None else ToyData())
    return trainer, module, logger


def assert_no_nan(logger: RecordingLogger) -> None:
    for _, metrics in logger.history:
        for name, value in metrics.items():
            assert math.isfinite(value), f"{name} = {value}"


# ----- the contract ---------------------------------------------------------------------------


class ShutdownGloo(L.Callback):
    """For ``ddp_spawn`` runs: the spawned ranks tear the process group down together at the end of
    fit (``espo_lightning.run.distributed.shutdown``: a barrier, then destroy), as the CLI does; a
    rank that exits while the other still talks to gloo otherwise aborts ("terminate called without
    an active exception", seen once in CI). ``teardown`` is the last hook of a run; no collective
    follows it in Lightning's spawn launcher."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        from espo_lightning.run.distributed import shutdown

        if trainer.world_size > 1:
            shutdown()
