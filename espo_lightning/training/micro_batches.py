"""Splitting a minibatch into micro-batches: the rows of one forward/backward pass.

One optimizer step covers the whole minibatch; its gradient is accumulated over micro-batches whose
size bounds activation memory. Two limits, either or both:

- ``micro_batch_size``: at most this many responses per pass;
- ``max_tokens``: at most this many *padded* tokens per pass (rows x trimmed width), with responses
  sorted by length (longest first, so the first pass is the most expensive one and a budget that
  does not fit fails at once) and packed greedily. A trimmed micro-batch is as wide as its longest
  prompt plus its longest completion (prompts are left padded, completions right padded). A single
  response longer than the budget gets a micro-batch of its own. With ``packed`` (``model.packing``)
  the budget counts real tokens only (the sum of prompt plus completion lengths): packed rows carry
  no padding.

With neither limit the minibatch is one pass, in its own row order.
"""
from __future__ import annotations

import torch
from torch import Tensor


def plan_micro_batches(prompt_lengths: Tensor, completion_lengths: Tensor, micro_batch_size: int | None,
                       max_tokens: int | None, packed: bool = False) -> list[Tensor]:
    """Row indices ``[m]`` (long) of each micro-batch; together they cover every row exactly once.

    Args:
        prompt_lengths: ``[B]`` real prompt tokens per row.
        completion_lengths: ``[B]`` completion tokens per row (the columns the forward pass carries).
        micro_batch_size: responses per micro-batch, or None for no limit.
        max_tokens: padded tokens per micro-batch (real tokens with ``packed``), or None for no limit.
        packed: count real tokens, as a padding-free pass processes them.
    """
    rows = prompt_lengths.shape[0]
    if micro_batch_size is None and max_tokens is None:
        return [torch.arange(rows)]
    prompt_lengths, completion_lengths = prompt_lengths.cpu(), completion_lengths.cpu()
    order = torch.sort(prompt_lengths + completion_lengths, descending=True, stable=True).indices.tolist()
    limit = micro_batch_size or rows
    plans: list[list[int]] = []
    current: list[int] = []
    widest_prompt = widest_completion = real = 0
    for i in order:
        p, c = int(prompt_lengths[i]), int(completion_lengths[i])
        width = max(widest_prompt, p) + max(widest_completion, c)
        cost = real + p + c if packed else (len(current) + 1) * width
        full = len(current) >= limit or (max_tokens is not None and cost > max_tokens)
        if current and full:
            plans.append(current)
            current, widest_prompt, widest_completion, real = [], 0, 0, 0
        current.append(i)
        widest_prompt, widest_completion = max(widest_prompt, p), max(widest_completion, c)
        real += p + c
    if current:
        plans.append(current)
    return [torch.tensor(p, dtype=torch.long) for p in plans]


def is_every_row(index: Tensor, rows: int) -> bool:
    """Whether the row indices ``index`` are all ``rows`` rows in their own order, as
    ``plan_micro_batches`` gives a micro-batch without limits."""
    return index.device.type == "cpu" and torch.equal(index, torch.arange(rows))


def is_one_pass(plan: list[tuple[Tensor, bool]], rows: int) -> bool:
    """Whether ``plan`` (``(row indices, padding)`` per pass) is a single real pass over all ``rows``
    in their own order."""
    return len(plan) == 1 and not plan[0][1] and is_every_row(plan[0][0], rows)
