"""The diagnostics callbacks inside a real Lightning ``Trainer``, on a toy LightningModule whose
``training_step`` returns the same ``{"loss", "metrics", "batch"}`` dict as ``PolicyModule``.

The toy's "loss" computes the metrics of DESIGN section 2 from a ``RolloutBatch`` whose
``engine_logprobs`` play the role of the current log-probs, so every logged number can be checked
against values computed directly from the same batches. Epoch aggregates are checked against the
metrics of all the epoch's batches concatenated into one: that is what token weighting means (and
what one rank holding all the data computes)."""
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
def test_step_contract_reads_outputs_and_tolerates_missing_parts():
    b = toy_batch(0)
    metrics = toy_metrics(b)
    out = {"loss": torch.tensor(1.0), "metrics": metrics, "batch": b}
    assert step_diagnostics(out) == metrics
    assert step_batch(out) is b
    assert step_diagnostics(None) == {} and step_diagnostics({"loss": 1}) == {}
    assert step_batch({"loss": 1}, batch=b) is b and step_batch(None) is None


def test_weighted_mean_is_a_ratio_of_sums_and_nan_without_weight():
    m = WeightedMean()
    assert math.isnan(m.compute().item())
    m.update(torch.tensor(0.5), torch.tensor(10.0))
    m.update(torch.tensor(0.0), torch.tensor(30.0))
    assert m.compute().item() == pytest.approx(5.0 / 40.0)


def test_histogram_sketch_counts_and_moments():
    h = HistogramSketch(bins=4, upper=2.0)
    x = torch.tensor([0.1, 0.6, 0.7, 1.9, 5.0, -1.0])  # 5.0 -> last bin, -1.0 -> first bin
    h.update(x)
    out = h.compute()
    assert out["counts"].tolist() == [2.0, 2.0, 0.0, 2.0]
    assert out["num"].item() == 6 and out["sum"].item() == pytest.approx(float(x.sum()))
    assert out["sum_squares"].item() == pytest.approx(float((x * x).sum()))
    assert (out["min"].item(), out["max"].item()) == (-1.0, 5.0)
    assert h.bucket_limits() == [0.5, 1.0, 1.5, 2.0]


# ----- the monitors inside a Trainer ----------------------------------------------------------
def test_clip_fraction_monitor_per_step_and_token_weighted_epoch():
    trainer, module, logger = fit([ClipFractionMonitor()], module=ToyModule(report_sequence_clip=True))
    assert len(module.seen) == 6
    for name in ("clip/low", "clip/high", "clip/total", "clip/sequence", "ratio/mean", "ratio/max"):
        expected = [toy_metrics(b, True)[name].item() for b in module.seen]
        assert logger.series(name) == pytest.approx(expected, rel=1e-5), name
    for epoch in (0, 1):
        pooled = toy_metrics(cat_batches(epoch_batches(epoch)), True)
        for name in ("clip/low", "clip/high", "clip/total", "clip/sequence", "ratio/mean", "ratio/max"):
            assert logger.series(name + "_epoch")[epoch] == pytest.approx(pooled[name].item(), rel=1e-5), name
    # token weighting is not the mean of per-step values (the steps have different sizes)
    per_step = [toy_metrics(b)["clip/total"].item() for b in epoch_batches(0)]
    assert abs(sum(per_step) / 3 - logger.series("clip/total_epoch")[0]) > 1e-4
    assert_no_nan(logger)


def test_entropy_group_monitor_means_groups_and_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    recorder = RecordingLogger()
    trainer, module, _ = fit([EntropyGroupMonitor(histogram_bins=16)], logger=[tb, recorder])
    expected_steps = [float((b.entropies * b.completion_mask).sum() / b.completion_mask.sum()) for b in module.seen]
    assert recorder.series("entropy/mean") == pytest.approx(expected_steps, rel=1e-5)
    for epoch in (0, 1):
        full = cat_batches(epoch_batches(epoch))
        mask = full.completion_mask
        assert recorder.series("entropy/mean_epoch")[epoch] == pytest.approx(
            float(full.entropies[mask].mean()), rel=1e-5)
        pooled = toy_metrics(full)
        for k in (0, 1):
            for field in ("size_frac", "entropy_mean", "epsilon_mean", "clip_frac", "ratio_mean"):
                name = f"entropy_group/{k}/{field}"
                assert recorder.series(name + "_epoch")[epoch] == pytest.approx(pooled[name].item(), rel=1e-5), name
    assert recorder.series("entropy_group/1/clip_frac") == pytest.approx(
        [toy_metrics(b)["entropy_group/1/clip_frac"].item() for b in module.seen], rel=1e-5)
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0}).Reload()
    hist = acc.Histograms("entropy/histogram")
    assert [h.step for h in hist] == [3, 6]
    assert hist[0].histogram_value.num == sum(int(b.completion_mask.sum()) for b in epoch_batches(0))
    assert hist[0].histogram_value.max <= math.log(15) + 1e-6  # range defaults from log(V) when known


def test_gradient_utilization_monitor_and_pre_clip_grad_norm():
    # A tiny clip value: the logged norm must be the norm before Lightning clips.
    trainer, module, logger = fit([GradientUtilizationMonitor()], module=ToyModule(lr=0.1),
                                  gradient_clip_val=1e-3)
    steps = module.seen
    assert logger.series("grad/norm") == pytest.approx([abs(toy_loss(b).item()) for b in steps], rel=1e-5)
    assert logger.series("grad_util/token") == pytest.approx(
        [toy_metrics(b)["grad_util/token"].item() for b in steps], rel=1e-5)

    def effective(b):
        m = toy_metrics(b)
        nonzero = (b.completion_mask & (b.advantages.unsqueeze(1) != 0)).sum()
        return m["grad_util/token"] * m["count/tokens"], nonzero

    assert logger.series("grad_util/effective") == pytest.approx(
        [float(a / n) for a, n in map(effective, steps)], rel=1e-5)
    for epoch in (0, 1):
        batches = epoch_batches(epoch)
        pooled = toy_metrics(cat_batches(batches))
        active, nonzero = (sum(x) for x in zip(*map(effective, batches)))
        assert logger.series("grad_util/effective_epoch")[epoch] == pytest.approx(float(active / nonzero), rel=1e-5)
        assert 0 < logger.series("grad_util/effective_epoch")[epoch] <= 1
        for name in ("grad_util/token", "grad_util/sequence"):
            assert logger.series(name + "_epoch")[epoch] == pytest.approx(pooled[name].item(), rel=1e-5)
        norms = [abs(toy_loss(b).item()) for b in batches]
        assert logger.series("grad/norm_epoch")[epoch] == pytest.approx(sum(norms) / 3, rel=1e-5)
        assert logger.series("grad/norm_max_epoch")[epoch] == pytest.approx(max(norms), rel=1e-5)
    assert_no_nan(logger)


def test_rollout_monitor_global_numbers_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    recorder = RecordingLogger()
    data = ToyData()
    fit([RolloutMonitor(num_samples=2)], data=data, logger=[tb, recorder])
    stats = data.last_rollout  # epoch 1
    scored = stats.rewards[~stats.rewards.isnan()]
    expect = {
        "reward/mean": scored.mean(), "reward/std": scored.std(), "reward/accuracy": stats.correct.mean(),
        "reward/unscored_frac": stats.rewards.isnan().float().mean(),
        "rollout/response_len_mean": stats.response_lengths.mean(),
        "rollout/truncated_frac": stats.truncated.mean(),
        "rollout/zero_std_group_frac": (stats.zero_std_groups / stats.num_groups),
        "rollout/engine_logprob_diff_mean": stats.engine_logprob_diff.mean(),
        "rollout/engine_logprob_diff_max": stats.engine_logprob_diff.max(),
        "perf/rollout_time_s": torch.tensor(1.0),
        "perf/rollout_tokens_per_s": torch.tensor(stats.generated_tokens / 1.0),
    }
    for name, value in expect.items():
        assert len(recorder.series(name)) == 2, name
        assert recorder.series(name)[1] == pytest.approx(float(value), rel=1e-5), name
    update_time = recorder.series("perf/update_time_s")[1]
    tokens = sum(float(b.completion_mask.sum()) for b in epoch_batches(1))
    assert update_time > 0
    assert recorder.series("perf/train_tokens_per_s")[1] == pytest.approx(tokens / update_time, rel=1e-4)
    assert_no_nan(recorder)
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    text = acc.Tensors("rollout/samples/text_summary")
    assert len(text) == 2
    body = text[0].tensor_proto.string_val[0].decode()
    assert "12+3=" in body and "reward: **1**" in body and "unscored" in body


def test_empty_epochs_and_empty_groups_log_no_nan():
    logger = RecordingLogger()
    callbacks = [ClipFractionMonitor(), EntropyGroupMonitor(), GradientUtilizationMonitor(), RolloutMonitor()]
    fit(callbacks, data=ToyData(empty=True), logger=logger)
    assert_no_nan(logger)
    names = logger.names()
    assert "clip/low_epoch" not in names and "entropy/mean_epoch" not in names  # nothing to average
    assert "entropy_group/0/size_frac_epoch" not in names
    assert "reward/mean" in names  # the rollout itself had responses


def test_example_custom_callback_logs_advantage_statistics():
    trainer, module, logger = fit([AdvantageHistogram(bins=9, limit=2.0)])
    for epoch in (0, 1):
        full = cat_batches(epoch_batches(epoch))
        adv = full.advantages[full.completion_mask.any(1)]
        assert logger.series("advantage/abs_mean_epoch")[epoch] == pytest.approx(float(adv.abs().mean()), rel=1e-5)
        assert logger.series("advantage/nonzero_frac_epoch")[epoch] == pytest.approx(
            float((adv != 0).float().mean()), rel=1e-5)


def test_sync_step_false_logs_local_values_without_a_process_group():
    logger = RecordingLogger()
    trainer, module, _ = fit([ClipFractionMonitor(sync_step=False, log_every_step=True)], logger=logger, epochs=1)
    assert logger.series("clip/low") == pytest.approx([toy_metrics(b)["clip/low"].item() for b in module.seen])
    trainer, module, logger2 = fit([ClipFractionMonitor(log_every_step=False)], epochs=1)
    assert "clip/low" not in logger2.names() and "clip/low_epoch" in logger2.names()


def test_unlogged_steps_still_count_in_the_epoch_aggregates():
    trainer, module, logger = fit([ClipFractionMonitor(), GradientUtilizationMonitor()], epochs=1,
                                  log_every_n_steps=2)
    assert logger.series("clip/low") == pytest.approx([toy_metrics(module.seen[1])["clip/low"].item()])
    assert len(logger.series("grad/norm")) == 1
    pooled = toy_metrics(cat_batches(epoch_batches(0)))
    assert logger.series("clip/low_epoch") == pytest.approx([pooled["clip/low"].item()], rel=1e-5)
    norms = [abs(toy_loss(b).item()) for b in module.seen]
    assert logger.series("grad/norm_epoch") == pytest.approx([sum(norms) / 3], rel=1e-5)


class ESPOToyModule(ToyModule):
    """The toy with the real ``ESPOLoss`` (vocabulary of 15) producing the step's metrics."""

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        from espo_lightning.losses import ESPOLoss

        self.seen.append(batch)
        loss_fn = ESPOLoss(vocab_size=15)
        logprobs = batch.engine_logprobs + 0 * self.weight
        loss, metrics = loss_fn(logprobs=logprobs, old_logprobs=batch.old_logprobs, advantages=batch.advantages,
                                mask=batch.completion_mask, entropies=batch.entropies)
        return {"loss": loss, "metrics": metrics, "batch": batch}


def test_epoch_aggregates_of_the_real_espo_loss_equal_its_metrics_on_the_pooled_epoch():
    losses = pytest.importorskip("espo_lightning.losses")
    _, _, logger = fit([ClipFractionMonitor(), EntropyGroupMonitor(), GradientUtilizationMonitor()],
                       module=ESPOToyModule())
    for epoch in (0, 1):
        full = cat_batches(epoch_batches(epoch))
        _, pooled = losses.ESPOLoss(vocab_size=15)(
            logprobs=full.engine_logprobs, old_logprobs=full.old_logprobs, advantages=full.advantages,
            mask=full.completion_mask, entropies=full.entropies)
        checked = [k for k in pooled if not k.startswith("count/")]
        assert "entropy_group/1/epsilon_mean" in checked
        for name in checked:
            assert logger.series(name + "_epoch")[epoch] == pytest.approx(pooled[name].item(), rel=1e-5), name
