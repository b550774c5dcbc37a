"""A reward for the evaluation end-to-end test whose verdicts are known in advance, whatever the
model writes: it lives in a module because the 2-rank ``validate`` subprocess imports it by name."""
from __future__ import annotations


def digit_sum(prompt: str) -> int:
    return sum(int(c) for c in prompt if c.isdigit())


def alternating_samples(prompts, completions, **kw):
    """1.0 where the prompt's digit sum plus the number of times the same prompt came earlier in
    the call is odd. Evaluation scores a problem's k samples together, in sample order, so sample j
    of a problem is correct iff digit_sum + j is odd: exactly k / 2 of each problem's samples (k
    even), and a greedy sample (j = 0) iff the digit sum is odd."""
    seen: dict[str, int] = {}
    out = []
    for prompt in prompts:
        j = seen.get(prompt, 0)
        seen[prompt] = j + 1
        out.append(float((digit_sum(prompt) + j) % 2))
    return out
