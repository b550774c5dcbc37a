"""Callbacks are chosen purely in YAML through the real CLI (``espo_lightning.cli.main``): the standard
set by class path, and a later ``--config`` that swaps it for the example custom callback.
``Trainer.fit`` is replaced by a recorder, so the CLI parses, validates and instantiates everything
but trains nothing."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from callbacks import (AdvantageHistogram, ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor,
                       RolloutMonitor)
from espo_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "conf" / "quickstart.yaml"

STANDARD_YAML = """\
trainer:
  callbacks:
    - class_path: callbacks.ClipFractionMonitor
    - class_path: callbacks.EntropyGroupMonitor
      init_args:
        histogram_bins: 32
    - class_path: callbacks.GradientUtilizationMonitor
    - class_path: callbacks.RolloutMonitor
      init_args:
        num_samples: 2
"""

CUSTOM_YAML = """\
trainer:
  callbacks:
    - class_path: callbacks.example_custom.AdvantageHistogram
      init_args:
        bins: 21
        limit: 3.0
"""


@pytest.fixture
def fitted_callbacks(monkeypatch):
    """Runs ``main(args)`` with ``Trainer.fit`` replaced; returns the trainer's callbacks."""
    seen = {}

    def fake_fit(self, model, datamodule=None, **kwargs):
        seen["callbacks"] = list(self.callbacks)

    monkeypatch.setattr(pl.Trainer, "fit", fake_fit)

    def run(*configs: Path, extra: tuple[str, ...] = ()) -> list:
        args = ["fit", "--config", str(QUICKSTART)]
        for c in configs:
            args += ["--config", str(c)]
        main([*args, "--model.model_builder", "null", *extra])
        return seen["callbacks"]

    return run


def test_standard_set_from_yaml(tmp_path, fitted_callbacks):
    standard = tmp_path / "standard.yaml"
    standard.write_text(STANDARD_YAML)
    cbs = fitted_callbacks(standard, extra=("--trainer.default_root_dir", str(tmp_path)))
    types = [type(c) for c in cbs]
    for cls in (ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor, RolloutMonitor):
        assert types.count(cls) == 1
    (entropy,) = [c for c in cbs if isinstance(c, EntropyGroupMonitor)]
    assert entropy.histogram_bins == 32
    assert [c for c in cbs if isinstance(c, RolloutMonitor)][0].num_samples == 2


def test_a_later_config_swaps_the_standard_set_for_a_custom_callback(tmp_path, fitted_callbacks):
    standard, custom = tmp_path / "standard.yaml", tmp_path / "custom.yaml"
    standard.write_text(STANDARD_YAML)
    custom.write_text(CUSTOM_YAML)
    cbs = fitted_callbacks(standard, custom, extra=("--trainer.default_root_dir", str(tmp_path)))
    ours = [c for c in cbs if type(c).__module__.startswith("callbacks.")]
    assert [type(c) for c in ours] == [AdvantageHistogram]
    assert (ours[0].bins, ours[0].limit) == (21, 3.0)


def test_a_bad_init_arg_is_rejected_by_the_parser(tmp_path, fitted_callbacks, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CUSTOM_YAML.replace("bins: 21", "bins: many"))
    with pytest.raises(SystemExit) as exc:
        fitted_callbacks(bad, extra=("--trainer.default_root_dir", str(tmp_path)))
    assert exc.value.code != 0
    assert "bins" in capsys.readouterr().err
