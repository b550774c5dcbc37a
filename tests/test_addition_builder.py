"""The banded warm start of the embedded model: it stops in the target band, and a probe past the
band rewinds and replays the very same trajectory one step at a time."""
from __future__ import annotations

import json

import pytest
import torch

from espo_lightning.tasks.addition import AdditionModelBuilder, AdditionTask, problems
from espo_lightning.tasks.warm_start import build_model, build_tokenizer, warm_start

TASK = AdditionTask()


def _model():
    tok = build_tokenizer(TASK.symbols)
    return build_model(tok, hidden_size=32, num_layers=1, seed=0), tok


@pytest.mark.slow
def test_a_band_that_holds_at_once_stops_at_the_first_probe():
    model, tok = _model()
    out = warm_start(model, tok, TASK, steps=50, batch_size=8, band=(0.0, 1.0), check_every=5, probe=problems(8, 1))
    assert out.steps == 5 and out.accuracy is not None


@pytest.mark.slow
def test_a_probe_past_the_band_replays_the_same_trajectory_step_by_step():
    plain, tok = _model()
    warm_start(plain, tok, TASK, steps=6, batch_size=8)
    banded, _ = _model()
    # every accuracy is above this band: after the first probe (step 3) it rewinds to step 0 and
    # replays with a probe after every step, to the budget
    out = warm_start(banded, tok, TASK, steps=6, batch_size=8, band=(-1.0, -0.5), check_every=3, probe=problems(8, 1))
    assert out.steps == 6
    for (name, a), b in zip(plain.state_dict().items(), banded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_builder_records_where_the_warm_start_ended(tmp_path):
    AdditionModelBuilder(sft_steps=10, target_accuracy=(0.9, 1.0), check_every=5, hidden_size=32, num_layers=1)(tmp_path / "m")
    stamp = json.loads((tmp_path / "m" / "espo_builder.json").read_text())
    assert stamp["sft_steps_taken"] == 10 and stamp["spec"]["target_accuracy"] == [0.9, 1.0]
    assert 0.0 <= stamp["probe_accuracy"] <= 1.0


@pytest.mark.parametrize("kwargs", [{"target_accuracy": (0.8, 0.5)}, {"check_every": 0}, {"sft_steps": -1}])
def test_builder_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="AdditionModelBuilder"):
        AdditionModelBuilder(**kwargs)
