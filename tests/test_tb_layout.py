"""TensorBoard's Custom Scalars layout (``callbacks/layout.py``), read back from the event files:
clip low/high/total on one chart, each entropy group's clip fraction on one, each group's clip
range on one, reward with accuracy on one; its regexes match what the run logged."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

import callbacks
from callbacks.layout import custom_scalars_layout

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def read_run(log_dir: Path) -> tuple[list[layout_pb2.Layout], set[str]]:
    """Every layout written in ``log_dir``'s event files, and the scalar tags logged there."""
    layouts, scalars = [], set()
    for path in sorted(log_dir.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        if metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]:
            for event in acc.Tensors(metadata.CONFIG_SUMMARY_TAG):
                layouts.append(layout_pb2.Layout.FromString(event.tensor_proto.string_val[0]))
    return layouts, scalars


def charts(layout: layout_pb2.Layout) -> dict[str, tuple[str, list[str]]]:
    """title -> (category, tag regexes) of every multiline chart."""
    return {chart.title: (category.title, list(chart.multiline.tag))
            for category in layout.category for chart in category.chart}


def matching(regexes: list[str], tags: set[str]) -> set[str]:
    """The tags a chart shows: TensorBoard's own test, ``re.match`` (custom_scalars_plugin.py)."""
    return {tag for tag in tags if any(re.match(rx, tag) for rx in regexes)}


@pytest.mark.slow
def test_quickstart_run_writes_the_layout_once_and_its_charts_match_the_logged_metrics(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    args = [sys.executable, "-m", "espo_lightning", "fit", "--config", str(REPO / "conf/quickstart.yaml"),
            "--model.model_name_or_path", tiny_model_dir, "--model.model_builder", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--data.prompts_per_rollout", "4",
            "--data.num_generations", "4", "--data.minibatch_size", "8",
            "--data.val_data.init_args.num_problems", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(args, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    layouts, scalars = read_run(root / "lightning_logs" / "version_0")
    assert len(layouts) == 1, "one layout per run, written by whichever diagnostics callback starts first"
    found = charts(layouts[0])
    assert [c.title for c in layouts[0].category] == ["clipping", "gradient utilization", "reward and accuracy"]

    def shown(title_start: str) -> set[str]:
        (title,) = [t for t in found if t.startswith(title_start)]
        return matching(found[title][1], scalars)

    assert shown("clip fraction low / high / total, per step") == {"clip/low", "clip/high", "clip/total"}
    assert shown("clip fraction low / high / total, per epoch") == {"clip/low_epoch", "clip/high_epoch",
                                                                    "clip/total_epoch"}
    # ESPO's top_fraction grouping: two groups (0 = the 20% highest-entropy tokens)
    assert shown("clip fraction per entropy group") == {"entropy_group/0/clip_frac", "entropy_group/1/clip_frac"}
    assert shown("clip range (epsilon) per entropy group") == {"entropy_group/0/epsilon_mean",
                                                               "entropy_group/1/epsilon_mean"}
    assert shown("rollout reward and accuracy") == {"reward/mean", "reward/accuracy", "val/accuracy"}
    assert shown("active tokens") == {"grad_util/token", "grad_util/sequence"}


class Steps(BoringModel):
    """Four optimizer steps, no validation: enough for train start."""

    def val_dataloader(self):
        return None


def tiny_fit(tmp_path: Path, cbs: list, loggers=None) -> Path:
    loggers = [TensorBoardLogger(tmp_path, name="tb")] if loggers is None else loggers
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, limit_train_batches=4, limit_val_batches=0,
                        callbacks=cbs, logger=loggers, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", devices=1)
    torch.manual_seed(0)
    trainer.fit(Steps())
    tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    return Path(tb[0].log_dir) if tb else tmp_path


def test_removing_a_callback_removes_its_charts_only(tmp_path):
    layouts, _ = read_run(tiny_fit(tmp_path, [callbacks.ClipFractionMonitor(), callbacks.RolloutMonitor()]))
    assert len(layouts) == 1
    assert list(charts(layouts[0])) == ["clip fraction low / high / total, per step",
                                        "clip fraction low / high / total, per epoch",
                                        "rollout reward and accuracy, greedy validation accuracy"]


def test_no_diagnostics_callback_no_layout_unless_listed(tmp_path):
    assert read_run(tiny_fit(tmp_path / "a", []))[0] == []
    extra = {"category": "mine", "title": "advantages", "tags": ["^adv/.*$"]}
    layouts, _ = read_run(tiny_fit(tmp_path / "b", [callbacks.TensorBoardLayout(charts=[extra])]))
    assert len(layouts) == 1
    assert charts(layouts[0]) == {"advantages": ("mine", ["^adv/.*$"]),
                                  "rollout reward and accuracy, greedy validation accuracy":
                                      ("reward and accuracy", [r"^reward/(mean|accuracy)$",
                                                               r"^val/(.+/)?(accuracy|avg@\d+)$"])}
    with pytest.raises(ValueError, match=r"charts\[0\]"):
        callbacks.TensorBoardLayout(charts=[{"title": "no tags"}])


def test_without_tensorboard_logger_nothing_is_written_and_nothing_breaks(tmp_path):
    tiny_fit(tmp_path, [*(cls() for cls in callbacks.STANDARD)], loggers=[CSVLogger(tmp_path)])
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_logger_prefix_is_in_the_regexes():
    layout = custom_scalars_layout([callbacks.Chart("c", "t", ("^clip/low$", "val/x"))], prefix="train-")
    assert layout == {"c": {"t": ["Multiline", ["^train-clip/low$", "train-val/x"]]}}
