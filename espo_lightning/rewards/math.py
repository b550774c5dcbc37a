"""Math answer verification with math-verify: the reward for GSM8K / MATH-style prompts.

Where the answer is taken from:

- gold (the dataset's answer column): the text after the last ``####`` (GSM8K solutions, thousands
  separators removed), else the last ``\\boxed{...}`` (MATH solutions), else the whole string as a
  plain value (``"18"``, ``"\\frac{1}{2}"``, ``"(-\\infty, 3]"``, ``"\\text{Evelyn}"``).
- completion: the last ``\\boxed{...}`` (nested braces handled), else the last ``####`` line, else
  math-verify's own extraction on the end of the text ("the final answer is x", the last number, ...).

Both sides are parsed to sympy by math-verify and compared with ``math_verify.verify`` (numeric
tolerance, sets, intervals, matrices, equations, percent, units and degrees normalised). The string
math-verify matched is kept as well, so answers sympy cannot read (text answers) compare as strings.

Time bound. math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the
main thread. In the main thread we use it (``TIMEOUT_SECONDS``); in any other thread (a reward
worker, a dataloader thread) signal timeouts are switched off and time is bounded by the input
instead: the fallback extraction only reads the last ``MAX_TEXT_CHARS`` characters, and an answer
longer than ``MAX_ANSWER_CHARS`` or holding a number too large to evaluate cheaply (``10^{10^{10}}``,
``1000000!``: more than about ``MAX_DIGITS`` digits) is compared as a string only, never by sympy.
The guards apply in every thread so that a completion gets the same reward wherever it is scored.
They bound the known ways sympy stalls on short inputs; they are not a hard wall-clock limit.
"""
from __future__ import annotations

import math as _pymath
import re
import threading
import warnings
from functools import lru_cache
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = [
    "math_accuracy", "extract_answer", "gold_answer", "completion_text", "boxed_spans", "top_level_spans", "hash_answers",
]

TIMEOUT_SECONDS = 5  # per parse / per comparison, main thread only (signal.alarm takes whole seconds)
MAX_TEXT_CHARS = 4_000  # the fallback extraction reads only this many trailing characters
MAX_ANSWER_CHARS = 500  # longer extracted answers are compared as strings only
MAX_DIGITS = 4_000  # numbers beyond about this many digits are compared as strings only

# An extracted answer (boxed content, a plain gold value) is parsed as if it were boxed, which is
# how math-verify reads MATH answers; free text (a "####" line, the fallback) uses its default
# extraction, which finds numbers and "the answer is" anchors in prose.
_BOXED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_TEXT_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)
_BOX_OPEN = re.compile(r"\s*\\(?:boxed|fbox)\s*\{")
_BOX_UNBRACED = re.compile(r"\\boxed[ \t]+([^\s${}\\]+)")
_HASH_LINE = re.compile(r"(?<!#)####(?!#)[ \t]*([^\n]*)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


# ------------------------------------------------------------------------------------ extraction
def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages, whose
    last message's ``content`` is taken; content given as a list of parts has its text parts joined)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = completion.get("content", "")
        return completion_text(completion)
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        last = completion[-1]
        if isinstance(last, dict) and "content" in last:
            return completion_text(last["content"])
        if all(isinstance(part, dict) and "text" in part for part in completion):
            return "".join(part["text"] for part in completion)
    raise TypeError(
        f"a completion must be a string or a list of chat messages with 'content', got {type(completion).__name__}"
    )


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the content of every balanced ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``,
    in order of their closing brace (so an enclosing box comes after the boxes inside it).

    One pass over brace tokens; escaped braces (``\\{``, ``\\}``) do not count, and a box whose brace
    never closes is dropped."""
    spans: list[tuple[int, int]] = []
    open_boxes: list[tuple[int, int]] = []  # (brace depth outside the box, content start)
    depth = 0
    for m in _BOX_TOKENS.finditer(text):
        token = m.group()
        if token[0] == "\\" and token[-1] == "{" and len(token) > 2:
            open_boxes.append((depth, m.end()))
            depth += 1
        elif token == "{":
            depth += 1
        elif token == "}":
            depth = max(depth - 1, 0)
            if open_boxes and open_boxes[-1][0] == depth:
                spans.append((open_boxes.pop()[1], m.start()))
    return spans


def top_level_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans not nested inside another span."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            continue
        out.append((start, end))
    return out


def _last_boxed(text: str) -> str | None:
    """Content of the last non-empty top-level box (a box wrapped in a box is unwrapped)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    spans = boxed_spans(text)
    end_of = dict(spans)
    for start, end in reversed(top_level_spans(spans)):
        if not text[start:end].strip():
            continue
        while True:  # \boxed{\boxed{5}}: unwrap a box that is the whole content of a box
            inner = _BOX_OPEN.match(text, start)
            if inner is None or inner.end() not in end_of or text[end_of[inner.end()] + 1:end].strip():
                break
            start, end = inner.end(), end_of[inner.end()]
        return text[start:end].strip()
    unbraced = _BOX_UNBRACED.findall(text)  # "\boxed 5", valid LaTeX for a one-token argument
    return unbraced[-1] if unbraced else None


def hash_answers(text: str) -> list[str]:
    """Non-empty contents of the ``#### x`` lines (GSM8K's answer marker), in order, as written."""
    if "####" not in text:
        return []
    return [m.group(1).strip() for m in _HASH_LINE.finditer(text) if m.group(1).strip()]


def _last_hash_answer(text: str) -> str | None:
    """Content of the last ``#### x`` line, thousands separators removed."""
    found = hash_answers(text)
    return _clean_hash(found[-1]) if found else None


def _clean_hash(answer: str) -> str:
    return _THOUSANDS_COMMA.sub("", answer).replace("\\$", "$").strip()


def _strip_period(answer: str) -> str:
    # "\boxed{18.}" and "#### 18." end a sentence; math-verify reads "18." as unparseable.
    return answer[:-1].rstrip() if answer.endswith(".") and len(answer) > 1 else answer


def _fallback_string(parsed: list) -> str:
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else str(parsed[0])


def extract_answer(text: Any) -> str | None:
    """The final answer of a completion as a string, or None when it states none.

    The last ``\\boxed{...}`` (nested braces handled), else the last ``#### x`` line, else the string
    math-verify's own extraction picks from the end of the text ("the answer is 7", a final number).
    """
    answer, _ = _extract(completion_text(text))
    return answer


def _extract(text: str) -> tuple[str | None, list | None]:
    """(answer string, its math-verify parse) of a completion; the parse is None when not done yet."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, None
    hashed = _last_hash_answer(text)
    if hashed is not None:
        parsed = _parse_text(_strip_period(hashed)) if len(hashed) <= MAX_ANSWER_CHARS else [hashed]
        if parsed:
            return hashed, parsed
        # "#### Step 1" style markdown headings: not an answer, keep looking
    parsed = _parse_text(text[-MAX_TEXT_CHARS:])
    if not parsed:
        return None, None
    return _fallback_string(parsed), parsed


def gold_answer(text: Any) -> str:
    """The reference answer in a dataset's answer cell.

    The text after the last ``####`` (GSM8K; thousands separators removed), else the last
    ``\\boxed{...}`` (MATH solutions), else the stripped cell itself (a plain value).

    Raises:
        ValueError: when the cell is empty or None.
    """
    if text is None:
        raise ValueError("gold answer is None")
    text = str(text)
    hashed = _last_hash_answer(text)
    if hashed is not None:
        return hashed
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if not text.strip():
        raise ValueError("gold answer is empty")
    return text.strip()


# --------------------------------------------------------------------------------------- parsing
def _timeout() -> int | None:
    """Signal-based timeouts only where signals work: the main thread."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _parse_value(answer: str) -> list:
    """Parse an extracted answer (boxed content, a plain value) the way math-verify reads a box."""
    answer = _strip_period(answer.strip())
    if not answer:
        return []
    if len(answer) > MAX_ANSWER_CHARS:
        return [answer]
    parsed = parse("\\boxed{" + answer + "}", extraction_config=_BOXED_CONFIG, parsing_timeout=_timeout())
    return _guard(parsed, answer)


def _parse_text(text: str) -> list:
    """math-verify's default extraction on free text."""
    if not text.strip():
        return []
    parsed = parse(text, extraction_config=_TEXT_CONFIG, parsing_timeout=_timeout())
    return _guard(parsed, text)


def _guard(parsed: list, source: str) -> list:
    """Drop sympy values that would be expensive to compare; keep their strings for string equality."""
    if not any(_too_big(p) for p in parsed):
        return parsed
    strings = [p for p in parsed if isinstance(p, str)]
    return strings or [source.strip()]


def _too_big(value: Any) -> bool:
    """True when ``value`` holds a number of more than about MAX_DIGITS digits (a power tower, a huge
    factorial) that sympy would try to evaluate while comparing."""
    if isinstance(value, str):
        return False
    if isinstance(value, sympy.MatrixBase) and not isinstance(value, sympy.Basic):
        return any(_too_big(v) for v in value)
    if not isinstance(value, sympy.Basic):
        return False
    try:
        for node in sympy.postorder_traversal(value):  # inner powers are checked before outer ones
            if isinstance(node, sympy.Integer):
                if abs(int(node)).bit_length() > MAX_DIGITS * 3.33:
                    return True
            elif isinstance(node, sympy.Pow) and node.exp.is_number:
                exp = abs(complex(node.exp))
                base = abs(complex(node.base)) if node.base.is_number else 10.0
                base_digits = _pymath.log10(base) if base > 0 else 0.0
                if exp * max(1.0, abs(base_digits)) > MAX_DIGITS:
                    return True
            elif isinstance(node, sympy.factorial) and node.args[0].is_number:
                n = abs(complex(node.args[0]))
                if n > 1 and n * _pymath.log10(n) > MAX_DIGITS:
                    return True
    except (TypeError, ValueError, OverflowError, AttributeError, RecursionError):
        return True
    return False


@lru_cache(maxsize=8192)
def _parse_gold(text: str) -> tuple:
    """Parsed gold of one answer cell; cached because every sampled completion of a prompt and
    every epoch reuses the same gold."""
    raw = str(text)
    answer = gold_answer(raw)
    if _last_hash_answer(raw) is not None:
        parsed = _parse_text(_strip_period(answer)) or _parse_value(answer)
    else:
        parsed = _parse_value(answer)
    if not parsed:
        raise ValueError(f"math-verify could not parse the gold answer {answer!r}")
    return tuple(parsed)


def _parse_completion(text: str) -> list | None:
    answer, parsed = _extract(text)
    if answer is None:
        return None
    if parsed is None:
        # A box was found: it is the model's answer even when sympy cannot read it, so it is scored
        # (as a string) rather than reported unscorable, which would let it dodge the penalty.
        parsed = _parse_value(answer) or [answer]
    return parsed


# ---------------------------------------------------------------------------------------- reward
def math_accuracy(prompts: list[str] | None = None, completions: list[Any] | None = None,
                  answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """Reward 1.0 when a completion's final answer equals the gold answer, else 0.0, as in TRL.

    A completion that states no answer math-verify can find has been verified as wrong: 0.0 (were it
    None, a policy could dodge the penalty of wrong answers by not answering). None is kept for what
    cannot be verified at all: a gold answer that cannot be parsed (warned once per gold text;
    ``check_rows`` finds those when the data loads).

    Args:
        prompts: the prompts (unused; part of the reward-function convention).
        completions: generated texts (or TRL conversational message lists), one per row.
        answer: the dataset's answer column, one per row: a GSM8K solution (``#### 18``), a
            MATH solution with ``\\boxed{}``, or a plain value.
        **kwargs: other dataset columns (ignored).

    Raises:
        ValueError: when ``answer`` is missing or has a different length than ``completions``.
    """
    del prompts, kwargs
    if completions is None:
        raise ValueError("math_accuracy needs completions=")
    if answer is None:
        raise ValueError(
            "math_accuracy needs the dataset's answer column as answer=; "
            "set the prompt source's answer_column to the column holding the gold answers"
        )
    if len(answer) != len(completions):
        raise ValueError(f"math_accuracy got {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for row, (completion, gold_text) in enumerate(zip(completions, answer)):
        try:
            gold = _parse_gold(str(gold_text) if gold_text is not None else None)
        except ValueError as err:
            _warn_unverifiable(gold_text, err)
            rewards.append(None)
            continue
        pred = _parse_completion(completion_text(completion))
        if pred is None:
            rewards.append(0.0)  # no answer stated: verified wrong
            continue
        rewards.append(1.0 if verify(list(gold), pred, timeout_seconds=_timeout()) else 0.0)
    return rewards


_WARNED: set[str] = set()


def _warn_unverifiable(gold_text: Any, err: Exception) -> None:
    key = repr(gold_text)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"math_accuracy: cannot parse the gold answer {gold_text!r} ({err}); its completions "
                      "score None (no advantage)", stacklevel=3)


def check_rows(rows: list[dict]) -> None:
    """Check that every row's gold answer (column ``answer``) parses, before any training.

    Raises:
        ValueError: ``"row N: ..."`` (1-based) for the first row without a usable gold answer.
    """
    for n, row in enumerate(rows, start=1):
        gold_text = row.get("answer")
        try:
            _parse_gold(str(gold_text) if gold_text is not None else None)
        except (ValueError, TypeError) as err:
            raise ValueError(f"row {n}: math_accuracy cannot parse the gold answer {gold_text!r} ({err})") from None


math_accuracy.check_rows = check_rows  # the DataModule runs it on the prompt sources when they load
