"""Reward functions: math_accuracy on the real GSM8K test split and hand cases, format, exact match."""
from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_lightning.rewards import (
    RegexFormatReward,
    exact_match,
    extract_answer,
    format_reward,
    gold_answer,
    math_accuracy,
)

from conftest import GSM8K  # tests/data/gsm8k_test.jsonl, shipped with the tests


def score(gold: str, completion) -> float | None:
    return math_accuracy(prompts=["q"], completions=[completion], answer=[gold])[0]


# --------------------------------------------------------------------------------- real GSM8K data
@pytest.fixture(scope="module")
def gsm8k_answers() -> list[str]:
    assert GSM8K.exists(), f"the real GSM8K test split ships with the tests: {GSM8K} is missing"
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 1319
    return [row["answer"] for row in rows]


def test_gsm8k_gold_solutions_score_correct(gsm8k_answers):
    """The full gold solution (ending '#### x') and '\\boxed{x}' both score 1.0 against the gold;
    each distinct gold cell is parsed once for both passes (the cache every sampled completion of a
    prompt shares), not once per completion."""
    from espo_lightning.rewards.math import _parse_gold

    _parse_gold.cache_clear()
    full = math_accuracy(prompts=None, completions=gsm8k_answers, answer=gsm8k_answers)
    boxed = math_accuracy(prompts=None, completions=[f"\\boxed{{{gold_answer(a)}}}" for a in gsm8k_answers],
                          answer=gsm8k_answers)
    n = len(gsm8k_answers)
    assert sum(r == 1.0 for r in full) / n >= 0.999, [a for a, r in zip(gsm8k_answers, full) if r != 1.0][:5]
    assert sum(r == 1.0 for r in boxed) / n >= 0.999
    assert _parse_gold.cache_info().misses == len(set(gsm8k_answers))


def test_gsm8k_mismatched_answers_score_wrong(gsm8k_answers):
    """Gold of row i against the solution of row i+1 (pairs with numerically equal answers skipped)."""
    golds, completions = [], []
    for gold, other in zip(gsm8k_answers, gsm8k_answers[1:]):
        if float(gold_answer(gold)) != float(gold_answer(other)):
            golds.append(gold)
            completions.append(other)
    rewards = math_accuracy(prompts=None, completions=completions, answer=golds)
    assert len(golds) > 1200
    assert None not in rewards
    assert sum(r == 1.0 for r in rewards) / len(rewards) <= 0.01


def test_gsm8k_gold_answer_strips_thousands_separators(gsm8k_answers):
    for solution in gsm8k_answers:
        value = gold_answer(solution)
        assert "," not in value and float(value) == float(solution.rsplit("####", 1)[1].replace(",", ""))


# ------------------------------------------------------------------------------------- hand cases
@pytest.mark.parametrize(
    ("gold", "completion", "expected"),
    [
        # fractions, decimals, LaTeX vs plain
        ("\\frac{1}{2}", "So the answer is \\boxed{0.5}.", 1.0),
        ("0.5", "\\boxed{\\frac12}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1.0),
        ("\\frac{14}{3}", "\\boxed{4\\frac{2}{3}}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
        ("Solution ... so the result is $\\boxed{\\frac{1}{2}}$.", "\\boxed{\\frac{\\sqrt{4}}{4}}", 1.0),
        # nested braces: the whole last box is taken
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1.0),
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{3}}", 0.0),
        ("3", "\\boxed{2} was wrong, so \\boxed{3}", 1.0),
        ("2", "\\boxed{2} was wrong, so \\boxed{3}", 0.0),
        ("3", "\\boxed{\\boxed{3}}", 1.0),
        # commas in numbers
        ("1234", "\\boxed{1,234}", 1.0),
        ("#### 1,234", "#### 1234", 1.0),
        ("1000000", "The total is \\boxed{1,000,000} dollars", 1.0),
        # negative numbers
        ("-5", "\\boxed{-5}", 1.0),
        ("-5", "\\boxed{5}", 0.0),
        ("#### -3", "It drops by 3, so #### -3", 1.0),
        # GSM8K-style answers with currency, units, trailing periods
        ("18", "#### $18", 1.0),
        ("18", "#### 18 dollars.", 1.0),
        ("18", "\\boxed{18.}", 1.0),
        ("18", "\\boxed{\\$18}", 1.0),
        ("18", "\\boxed{18 \\text{ dollars}}", 1.0),
        ("18", "She makes 9 * 2 = 18 dollars. The answer is 18.", 1.0),
        # MATH-500-style answers: intervals, roots, degrees, text, sets, matrices, expressions
        ("(-\\infty, 3]", "\\boxed{(-\\infty,3]}", 1.0),
        ("(-\\infty, 3]", "\\boxed{(-\\infty,3)}", 0.0),
        ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
        ("11\\sqrt2", "\\boxed{11\\sqrt{2}}", 1.0),
        ("30^\\circ", "\\boxed{30}", 1.0),
        ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", 1.0),
        ("\\text{Evelyn}", "\\boxed{\\text{Bob}}", 0.0),
        ("\\text{(C)}", "\\boxed{C}", 1.0),
        ("\\text{(C)}", "\\boxed{\\text{(D)}}", 0.0),
        ("\\{1, 2\\}", "\\boxed{2, 1}", 1.0),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", 1.0),
        ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
        ("50\\%", "\\boxed{50}", 1.0),
        ("5", "\\boxed{x=5}", 1.0),
        ("2\\pi", "\\boxed{6.28}", 0.0),
        # answers without a box, found by math-verify's own extraction
        ("3", "Therefore, the final answer is $3$. I hope it is correct.", 1.0),
        ("3", "The answer is 4.", 0.0),
        # no answer stated: verified wrong, 0.0 as in TRL (None would let a policy dodge the penalty)
        ("3", "", 0.0),
        ("3", "I do not know.", 0.0),
        ("3", "\\boxed{}", 0.0),
        ("3", "\\boxed{3", 0.0),  # truncated before the box closed
    ],
)
def test_math_accuracy_hand_cases(gold, completion, expected):
    assert score(gold, completion) == expected


def test_unreadable_box_is_scored_wrong_not_unscorable():
    """A box is the model's answer even when sympy cannot read it: 0.0, so it cannot dodge the penalty."""
    assert score("7", "\\boxed{\\overline{\\qquad}}") == 0.0


def test_huge_numbers_are_compared_as_strings_never_by_sympy(monkeypatch):
    """A power tower or a huge factorial reaches ``verify`` as its string only: sympy never gets a
    value it would try to evaluate (what kept scoring fast, whatever the machine)."""
    import sympy

    import espo_lightning.rewards.math as math_reward

    seen, real = [], math_reward.verify
    monkeypatch.setattr(math_reward, "verify", lambda gold, pred, **kw: seen.append(pred) or real(gold, pred, **kw))
    assert score("10", "\\boxed{10^{10^{10}}}") == 0.0
    assert score("9", "\\boxed{9^{9^{9^{9}}}}") == 0.0
    assert score("5", "\\boxed{1000000!}") == 0.0
    assert len(seen) == 3 and all(isinstance(p, str) for pred in seen for p in pred), seen
    assert score("1024", "\\boxed{2^{10}}") == 1.0  # a small power is still evaluated by sympy
    assert any(isinstance(p, sympy.Basic) for p in seen[-1])


def test_same_rewards_off_the_main_thread():
    """Signal timeouts are off in worker threads; results must not change and nothing must hang."""
    golds = ["\\frac{1}{2}", "18", "(-\\infty, 3]", "10", "3", "#### 1,234"]
    completions = ["\\boxed{0.5}", "#### 17", "\\boxed{(-\\infty,3]}", "\\boxed{10^{10^{10}}}", "no idea", "#### 1234"]
    expected = math_accuracy(prompts=None, completions=completions, answer=golds)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(math_accuracy(prompts=None, completions=completions,
                                                                         answer=golds)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert result == [expected] and expected == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_unparseable_gold_scores_none_with_one_warning_and_check_rows_names_the_row():
    """A gold answer that cannot be parsed cannot be verified: None (no advantage), warned once per
    gold text; ``math_accuracy.check_rows`` (run when the data loads) names the first such row."""
    import warnings

    golds = ["1", "\\boxed{}", "\\boxed{}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewards = math_accuracy(prompts=None, completions=["\\boxed{1}", "\\boxed{2}", "x"], answer=golds)
        math_accuracy(prompts=None, completions=["\\boxed{2}"], answer=["\\boxed{}"])
    assert rewards == [1.0, None, None]
    assert sum("cannot parse the gold answer" in str(w.message) for w in caught) <= 1
    with pytest.raises(ValueError, match=r"row 2: math_accuracy cannot parse the gold answer"):
        math_accuracy.check_rows([{"answer": "1"}, {"answer": "   "}])
    math_accuracy.check_rows([{"answer": "#### 1,234"}, {"answer": 7}])  # a numeric answer column works


def test_empty_completion_gets_a_negative_advantage_when_group_mates_answer():
    """Under math_accuracy alone, a policy that stops answering is penalised like a wrong answer."""
    from espo_lightning.rollout.advantages import group_advantages, rewards_to_tensor

    rewards = math_accuracy(prompts=None, completions=["\\boxed{4}", "", "The answer is 4.", "I am not sure."],
                            answer=["4"] * 4)
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    adv = group_advantages(rewards_to_tensor(rewards), 4)
    assert adv[1] < 0 and adv[3] < 0 and adv[0] > 0


def test_length_mismatch_and_missing_answer_raise():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_accuracy(prompts=None, completions=["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="answer_column"):
        math_accuracy(prompts=None, completions=["1"])


def test_conversational_completions_and_extra_columns():
    completions = [[{"role": "assistant", "content": "so \\boxed{4}"}], [{"role": "assistant", "content": "5"}]]
    assert math_accuracy(prompts=None, completions=completions, answer=["4", "4"], question=["a", "b"]) == [1.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9))
def test_integers_with_thousands_separators(n):
    gold = f"Some working.\n#### {n:,}"
    assert score(gold, f"\\boxed{{{n:,}}}") == 1.0
    assert score(gold, f"#### {n}") == 1.0
    assert score(gold, f"\\boxed{{{n + 1}}}") == 0.0


# ------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x \\boxed{\\frac{a}{b}} y", "\\frac{a}{b}"),
        ("\\boxed{1} then \\boxed{\\{2, 3\\}}", "\\{2, 3\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5", "5"),
        ("work\n#### 1,234\n", "1234"),
        ("The final answer is 42. Done", "42"),
        ("\\boxed{}", None),
        ("", None),
        ("nothing here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.text(alphabet="abc123+-", max_size=4),
                    lambda inner: st.builds(lambda a, b: a + "{" + b + "}", inner, inner), max_leaves=8))
def test_extract_answer_takes_the_whole_balanced_box(content):
    if content.strip():
        assert extract_answer(f"We get \\boxed{{x}} then \\boxed{{{content}}} at last.") == content.strip()


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 70,000", "70000"),
        ("Thus the answer is $\\boxed{\\frac{\\pi}{2}}$.", "\\frac{\\pi}{2}"),
        ("  (-\\infty, 3] ", "(-\\infty, 3]"),
        (82, "82"),
    ],
)
def test_gold_answer(cell, expected):
    assert gold_answer(cell) == expected


def test_gold_answer_rejects_empty():
    with pytest.raises(ValueError):
        gold_answer("")
    with pytest.raises(ValueError):
        gold_answer(None)


# ------------------------------------------------------------------------------------ format/exact
def test_format_reward():
    completions = [
        "so \\boxed{3}",
        "the answer is 3",
        "\\boxed{1} or \\boxed{2}",
        "work\n#### 5",
        "#### 5\nso \\boxed{5}",
        "\\boxed{\\frac{1}{\\boxed{2}}}",  # nested box counts once
        "\\boxed{}",
        "\\boxed{3",
        [{"role": "assistant", "content": "\\boxed{3}"}],
    ]
    assert format_reward(prompts=None, completions=completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_regex_format_reward():
    reward = RegexFormatReward(r"^<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", reward=0.5)
    completions = ["<think>a\nb</think>\n<answer>3</answer>\n", "<answer>3</answer>", "<think></think><answer>3</answer> x"]
    assert reward(prompts=None, completions=completions, answer=["3"] * 3) == [0.5, 0.0, 0.0]
    assert RegexFormatReward(r"\d")(completions=["a1", "b"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RegexFormatReward("(unclosed")


def test_exact_match():
    completions = ["82", " 82 \nmore", "\n82", "8 2", "820", "", [{"role": "assistant", "content": "82"}]]
    assert exact_match(prompts=None, completions=completions, answer=["82", "82", 82, "82", "82", "82", "82"]) == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        exact_match(prompts=None, completions=["1"], answer=["1", "2"])


def test_overlong_penalty_by_hand():
    """L_max = 10, L_cache = 4: no penalty up to 6 tokens, then (6 - L) / 4 down to -1 at 10 tokens,
    -1 beyond (DAPO eq. 13); the penalty scale multiplies it."""
    from espo_lightning.rewards import OverlongPenalty

    reward = OverlongPenalty(max_completion_length=10, buffer_length=4)
    ids = [[0] * n for n in (0, 6, 7, 8, 10, 11)]
    assert reward(prompts=None, completions=[""] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert OverlongPenalty(10, 4, penalty=0.5)(completion_ids=ids)[3] == -0.25
    with pytest.raises(ValueError, match="buffer_length must be an integer in"):
        OverlongPenalty(10, 11)
    with pytest.raises(ValueError, match="needs completion_ids"):
        reward(prompts=None, completions=["x"])
