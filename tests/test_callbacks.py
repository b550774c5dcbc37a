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

from callback_toys import (RecordingLogger, ToyData, ToyModule, assert_no_nan, cat_batches, epoch_batches, fit, toy_batch, toy_loss, toy_metrics)


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
    from espo_lightning import losses  # the package under test: an import error must fail, not skip
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
