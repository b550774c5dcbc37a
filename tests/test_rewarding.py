"""Reward functions that misbehave stop the run with one line naming the function and the completion;
a NaN from one function is that function's None only."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from espo_lightning.errors import RewardError
from espo_lightning.rollout.rewarding import combined_rewards, reward_name, score_completions

REPO = Path(__file__).resolve().parents[1]
COMPLETIONS = ["a", "bb", "ccc"]


def raises_on_bb(prompts, completions, **_):
    return [1.0 / (len(c) != 2) for c in completions]  # ZeroDivisionError on the second completion


def returns_strings(prompts, completions, **_):
    return [1.0, "good", 0.0]


def returns_two(prompts, completions, **_):
    return [1.0, 0.0]


def nan_on_a(prompts, completions, **_):
    return [math.nan if c == "a" else 1.0 for c in completions]


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_reward_name_is_the_import_path():
    assert reward_name(raises_on_bb) == "test_rewarding.raises_on_bb"
    from espo_lightning.rewards import math_accuracy

    assert reward_name(math_accuracy) == "espo_lightning.rewards.math.math_accuracy"


@pytest.mark.parametrize("func, message", [
    (raises_on_bb, r"reward function test_rewarding.raises_on_bb raised on completion 1 \(ZeroDivisionError"),
    (returns_strings, r"reward function test_rewarding.returns_strings returned 'good' \(str\) for completion 1"),
    (returns_two, r"reward function test_rewarding.returns_two returned 2 values for 3 completions"),
])
def test_misbehaving_reward_functions_are_named(func, message):
    with pytest.raises(RewardError, match=message):
        score_completions([length_reward, func], ["p"] * 3, COMPLETIONS, {})


def test_nan_from_one_function_is_its_none_only():
    funcs = [nan_on_a, length_reward]
    per_func = score_completions(funcs, ["p"] * 3, COMPLETIONS, {})
    assert per_func[0] == [None, 1.0, 1.0]
    assert combined_rewards(funcs, [1.0, 0.5], ["p"] * 3, COMPLETIONS, {}, per_func) == [0.5, 2.0, 2.5]
    assert combined_rewards([nan_on_a], [1.0], ["p"] * 3, COMPLETIONS, {}) == [None, 1.0, 1.0]


@pytest.mark.slow
def test_a_raising_reward_ends_the_cli_run_with_one_line(tiny_model_dir, tmp_path, capsys):
    from test_cli_errors import error_line, run_main

    code, err = run_main(["fit", "--config", str(REPO / "conf/quickstart.yaml"), "--trainer.default_root_dir",
                          str(tmp_path), f"--model.model_name_or_path={tiny_model_dir}", "--model.model_builder=null",
                          "--data.reward_funcs=[test_rewarding.raises_on_bb]", "--trainer.max_epochs=1",
                          "--data.prompts_per_rollout=2", "--data.num_generations=2", "--data.minibatch_size=4"],
                         capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith("error: reward function test_rewarding.raises_on_bb raised on completion"), err[-2000:]
