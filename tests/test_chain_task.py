"""The long-response embedded task: responses written out step by step, graded on the final number,
long enough (>= 16 tokens) for entropy grouping to have something to group; its warm start."""
from __future__ import annotations

import json

import pytest
import torch

from espo_lightning.rewards import last_number_match
from espo_lightning.tasks.chain import ChainModelBuilder, ChainSource, ChainTask, worked
from espo_lightning.tasks.warm_start import build_tokenizer, sft_batch


def test_the_working_is_written_out_from_the_previous_result():
    assert worked((12, 34, 56)) == "12+34=46,46+56=102"
    assert worked((99, 99, 99, 99)) == "99+99=198,198+99=297,297+99=396"
    assert worked((5, 7)) == "5+7=12"


def test_responses_are_long_and_mostly_predictable():
    task = ChainTask()
    chains = task.problems(2000, seed=3)
    lengths = [len(task.response(p)) for p in chains]
    assert sum(lengths) / len(lengths) >= 16  # one token per character
    # decisive tokens: the digits after each "="; the rest is copied or format
    decisive = sum(len(step.split("=")[1]) for p in chains for step in task.response(p).split(","))
    assert decisive / sum(lengths) < 0.35
    assert max(lengths) + 1 <= task.max_new_tokens  # room for EOS


def test_source_rows_carry_the_final_answer():
    rows = ChainSource(num_problems=3, seed=7).rows()
    for row in rows:
        operands = [int(x) for x in row["prompt"].rstrip("=").split("+")]
        assert len(operands) == 3 and row["answer"] == str(sum(operands))
    assert rows == ChainSource(num_problems=3, seed=7).rows()


def test_last_number_match_by_hand():
    out = last_number_match(
        completions=["12+34=46,46+56=102", "12+34=46,46+56=10", "=102,", "no number", "1.5", "12+34=46,46+5"],
        answer=["102", "102", " 102 ", "102", "1.5", "102"])
    assert out == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert last_number_match(completions=[[{"role": "assistant", "content": "7+8=15"}]], answer=[15]) == [1.0]
    with pytest.raises(ValueError, match="last_number_match got 2 completions but 1 answers"):
        last_number_match(completions=["1", "2"], answer=["1"])


def test_task_grades_like_the_reward():
    task = ChainTask()
    p = (12, 34, 56)
    assert task.correct("12+34=46,46+56=102", p) and task.correct("102", p)
    assert not task.correct("12+34=46,46+56=101", p)


def test_warm_start_learns_the_response_not_the_prompt():
    task = ChainTask()
    tok = build_tokenizer(task.symbols)
    input_ids, attention, labels = sft_batch(tok, task, [(12, 34, 56), (5, 7, 9)])
    first = tok.decode([t for t, l in zip(input_ids[0], labels[0]) if l != -100])
    assert first == "12+34=46,46+56=102<eos>"
    second = tok.decode([t for t, l in zip(input_ids[1], labels[1]) if l != -100])
    assert second == "5+7=12,12+9=21<eos>"
    assert torch.equal(attention[1] == 0, input_ids[1] == tok.pad_token_id)


def _first_character_right(self, completion: str, chain) -> bool:
    """A lenient grade (the worked response's first character), so that a barely trained model
    scores neither 0 nor 1 and a recount on other problems or another model would show."""
    return completion[:1] == worked(chain)[:1]


@pytest.mark.slow
def test_builder_stamps_its_spec_and_the_saved_models_probe_accuracy(tmp_path, monkeypatch):
    """The stamp holds the spec, the steps taken, and the saved model's greedy accuracy on the 200
    chain probe problems, recounted here from the folder (one left-padded batch, as the probe
    decodes: bit-equal). After 20 steps the model may still write one response for every prompt;
    the lenient grade then counts the probe problems it matches (21 of 200 here), so a measurement
    on other or fewer problems shows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.tasks.chain import chains
    from espo_lightning.tasks.warm_start import PROBE_SEED

    monkeypatch.setattr(ChainTask, "correct", _first_character_right)
    ChainModelBuilder(sft_steps=20, target_accuracy=(0.9, 1.0), check_every=10, hidden_size=32, num_layers=1)(tmp_path / "m")
    stamp = json.loads((tmp_path / "m" / "espo_builder.json").read_text())
    assert stamp["spec"]["task"] == "chain" and stamp["spec"]["operands"] == 3
    assert stamp["sft_steps_taken"] == 20

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    probe = chains(200, PROBE_SEED, 3, 10, 99)
    enc = tok(["+".join(map(str, p)) + "=" for p in probe], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=ChainTask().max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert stamp["probe_accuracy"] == sum(t[:1] == worked(p)[:1] for t, p in zip(texts, probe)) / len(probe)


@pytest.mark.parametrize("cls,kwargs,match", [
    (ChainModelBuilder, {"operands": 1}, "ChainModelBuilder: operands"),
    (ChainModelBuilder, {"target_accuracy": (0.7, 0.2)}, "ChainModelBuilder: target_accuracy"),
    (ChainSource, {"num_problems": 0}, "ChainSource: num_problems"),
    (ChainSource, {"low": 9, "high": 3}, "ChainSource: need 0 <= low <= high"),
])
def test_bad_settings_name_the_class_and_key(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
