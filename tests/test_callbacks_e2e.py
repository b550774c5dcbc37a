"""A real 2-epoch fit of the tiny addition model through the CLI with the four standard callbacks
(chosen in YAML), checked through the TensorBoard event file: every diagnostic is present and
finite, and the numbers match values computed directly from the batches the module trained on
(recorded by ``StepRecorder``, also chosen in YAML)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest

from callbacks import step_batch, step_diagnostics
from espo_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


class StepRecorder(L.Callback):
    """Writes, per training step, the loss's metrics and numbers computed from the step's batch, and per
    epoch the rollout's mean reward, to ``path`` as JSON."""

    def __init__(self, path: str):
        self.path = path
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        b = step_batch(outputs, batch)
        mask = b.completion_mask
        adv = b.advantages.unsqueeze(1) if b.advantages.dim() == 1 else b.advantages
        self.steps.append({
            "epoch": trainer.current_epoch,
            "metrics": {k: float(v) for k, v in step_diagnostics(outputs).items()},
            "entropy_mean": float(b.entropies[mask].mean()),
            "tokens": float(mask.sum()),
            "nonzero_adv_tokens": float((mask & (adv != 0)).sum()),
        })

    def on_train_epoch_end(self, trainer, pl_module):
        stats = trainer.datamodule.last_rollout
        self.epochs.append({"reward_mean": stats.reward_mean, "responses": int(stats.rewards.numel())})
        Path(self.path).write_text(json.dumps({"steps": self.steps, "epochs": self.epochs}))


CALLBACKS_YAML = """\
trainer:
  callbacks:
    - callbacks.ClipFractionMonitor
    - callbacks.EntropyGroupMonitor
    - callbacks.GradientUtilizationMonitor
    - callbacks.RolloutMonitor
    - class_path: test_callbacks_e2e.StepRecorder
      init_args:
        path: {path}
"""

EXPECTED = [
    "clip/low", "clip/high", "clip/total", "clip/low_epoch", "clip/high_epoch", "clip/total_epoch",
    "ratio/mean", "ratio/max_epoch", "entropy/mean", "entropy/mean_epoch",
    *(f"entropy_group/{k}/{f}{s}" for k in (0, 1) for s in ("", "_epoch")
      for f in ("size_frac", "entropy_mean", "epsilon_mean", "clip_frac", "ratio_mean")),
    "grad_util/token", "grad_util/sequence", "grad_util/token_epoch", "grad_util/sequence_epoch",
    "grad_util/nonzero_adv_frac_epoch", "grad/norm", "grad/norm_epoch",
    "reward/mean", "reward/std", "reward/accuracy", "reward/unscored_frac", "rollout/response_len_mean",
    "rollout/truncated_frac", "rollout/zero_std_group_frac", "perf/rollout_tokens_per_s",
    "perf/train_tokens_per_s", "perf/rollout_time_s", "perf/update_time_s",
]


def _weighted(steps, epoch, name, weight_key="tokens"):
    rows = [s for s in steps if s["epoch"] == epoch]
    total = sum(s[weight_key] for s in rows)
    return sum(s["metrics"][name] * s[weight_key] for s in rows) / total


@pytest.mark.slow
def test_fit_with_the_standard_callbacks_logs_finite_consistent_diagnostics(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from espo_lightning.plots import load_scalars

    record = tmp_path / "record.json"
    config = tmp_path / "callbacks.yaml"
    config.write_text(CALLBACKS_YAML.format(path=record))
    main(["fit", "--config", str(REPO / "conf" / "quickstart.yaml"), "--config", str(config),
          "--model.model_name_or_path", tiny_model_dir, "--model.model_builder", "null", "--model.export_dir", "null",
          "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
          "--data.prompts_per_rollout", "4", "--data.num_generations", "4", "--data.minibatch_size", "8",
          "--data.val_data.init_args.num_problems", "8", "--data.val_batch_size", "8"])

    recorded = json.loads(record.read_text())
    steps = recorded["steps"]
    assert len(steps) == 4  # 2 epochs x 16 responses / 8 per minibatch
    scalars = load_scalars(tmp_path / "run")
    missing = [name for name in EXPECTED if name not in scalars]
    assert not missing, missing
    for name, (_, values) in scalars.items():
        assert all(math.isfinite(v) for v in values), name

    def series(name):
        return scalars[name][1].tolist()

    assert series("entropy/mean") == pytest.approx([s["entropy_mean"] for s in steps], rel=1e-5)
    for name in ("clip/total", "grad_util/token", "entropy_group/0/size_frac"):
        assert series(name) == pytest.approx([s["metrics"][name] for s in steps], rel=1e-5, abs=1e-7)
    for epoch in (0, 1):
        for name in ("clip/low", "clip/high", "clip/total", "grad_util/token", "ratio/mean"):
            assert series(name + "_epoch")[epoch] == pytest.approx(_weighted(steps, epoch, name), rel=1e-5, abs=1e-7)
        rows = [s for s in steps if s["epoch"] == epoch]
        nonzero = sum(s["nonzero_adv_tokens"] for s in rows) / sum(s["tokens"] for s in rows)
        assert series("grad_util/nonzero_adv_frac_epoch")[epoch] == pytest.approx(nonzero, rel=1e-5, abs=1e-7)
        reward = recorded["epochs"][epoch]["reward_mean"]
        assert series("reward/mean")[epoch] == pytest.approx(reward, rel=1e-5, abs=1e-7)
    assert scalars["reward/mean"][0].tolist() == scalars["clip/low_epoch"][0].tolist()  # logged at each epoch end

    folder = next((tmp_path / "run").rglob("events.out.tfevents*")).parent
    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "tensors": 0}).Reload()
    assert len(acc.Histograms("entropy/histogram")) == 2
    assert len(acc.Tensors("rollout/samples/text_summary")) == 2
