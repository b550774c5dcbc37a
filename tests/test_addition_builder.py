"""The banded warm start of the embedded model: it stops in the target band, and a probe past the
band rewinds and replays the very same trajectory one step at a time."""
from __future__ import annotations

import json

import pytest
import torch

from espo_lightning.tasks.addition import AdditionModelBuilder, AdditionTask, problems
from espo_lightning.tasks.warm_start import PROBE_SEED, build_model, build_tokenizer, warm_start

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


def _first_digit_right(self, completion: str, problem) -> bool:
    """A lenient grade (the answer's first digit), so that a barely trained model scores neither 0
    nor 1 and a recount on other problems or another model would show."""
    return completion[:1] == str(sum(problem))[:1]


def greedy_recount(folder, grade) -> float:
    """The saved model's greedy accuracy on the builder's 200 probe problems, counted here: loaded
    from the folder, decoded as one left-padded batch (as the probe does), graded by ``grade``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    probe = problems(200, PROBE_SEED)
    enc = tok([f"{a}+{b}=" for a, b in probe], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(grade(t, p) for t, p in zip(texts, probe)) / len(probe)


@pytest.mark.slow
def test_builder_records_the_saved_models_probe_accuracy(tmp_path, monkeypatch):
    """The stamped probe accuracy is the saved model's greedy accuracy on the 200 probe problems,
    recounted independently from the folder (bit-equal: the same batch through the same weights)."""
    monkeypatch.setattr(AdditionTask, "correct", _first_digit_right)
    AdditionModelBuilder(sft_steps=10, target_accuracy=(0.9, 1.0), check_every=5, hidden_size=32, num_layers=1)(tmp_path / "m")
    stamp = json.loads((tmp_path / "m" / "espo_builder.json").read_text())
    assert stamp["sft_steps_taken"] == 10 and stamp["spec"]["target_accuracy"] == [0.9, 1.0]
    assert stamp["probe_accuracy"] == greedy_recount(tmp_path / "m", lambda text, p: text[:1] == str(sum(p))[:1])


@pytest.mark.slow
def test_builder_stops_at_the_first_probe_inside_the_band(tmp_path, monkeypatch):
    """The band logic against a scripted probe (what the builder decides, not what the model
    learns): check_every 2, band [0.5, 0.7]. Probe after step 2: 0.1, below, go on; after step 4:
    0.9, past the band, so rewind to step 2 and probe every step; after step 3: 0.3; after step 4:
    0.6, inside: stop. The builder then measures the saved model once more (0.65) and stamps that.
    The warm start's own log is its problem draws: training step s draws with seed 10_000 + s."""
    import espo_lightning.tasks.warm_start as ws

    script, log = iter([0.1, 0.9, 0.3, 0.6, 0.65]), []
    draw = AdditionTask.problems

    def logged_problems(self, count, seed):
        log.append(("probe",) if seed == PROBE_SEED else ("step", seed - 10_000))
        return draw(self, count, seed)

    def scripted(model, tokenizer, task, batch):
        assert len(batch) == 200
        log.append(("accuracy", next(script)))
        return log[-1][1]

    monkeypatch.setattr(AdditionTask, "problems", logged_problems)
    monkeypatch.setattr(ws, "greedy_accuracy", scripted)
    AdditionModelBuilder(sft_steps=50, target_accuracy=(0.5, 0.7), check_every=2, hidden_size=32, num_layers=1)(tmp_path / "m")
    step = [("step", s) for s in range(5)]
    assert log == [("probe",), step[0], step[1], ("accuracy", 0.1), step[2], step[3], ("accuracy", 0.9),
                   step[2], ("accuracy", 0.3), step[3], ("accuracy", 0.6), ("accuracy", 0.65)]
    stamp = json.loads((tmp_path / "m" / "espo_builder.json").read_text())
    assert stamp["sft_steps_taken"] == 4 and stamp["probe_accuracy"] == 0.65


@pytest.mark.parametrize("kwargs", [{"target_accuracy": (0.8, 0.5)}, {"check_every": 0}, {"sft_steps": -1}])
def test_builder_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="AdditionModelBuilder"):
        AdditionModelBuilder(**kwargs)
