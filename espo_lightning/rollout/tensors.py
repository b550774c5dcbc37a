"""Packing prompt and completion token lists into a padded ``RolloutBatch``."""
from __future__ import annotations

import torch

from espo_lightning.rollout.batch import RolloutBatch


def build_rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        advantages: torch.Tensor, rewards: torch.Tensor,
                        engine_logprobs: list[list[float]] | None, temperature: float) -> RolloutBatch:
    """Prompts left padded to Lp, completions right padded to Lc (at least 1 column, so an empty
    completion still yields a valid [B, 1] tensor with its mask all False)."""
    # Padded rows built as Python lists and converted once: one tensor per field instead of a
    # handful of small tensor writes per response (which cost ~10 ms per 256-response rollout).
    n = len(prompt_ids)
    lp = max(len(p) for p in prompt_ids)
    lc = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.tensor([[pad_id] * (lp - len(p)) + list(p) + list(c) + [pad_id] * (lc - len(c))
                              for p, c in zip(prompt_ids, completion_ids)], dtype=torch.long)  # [n, lp + lc]
    attention = torch.tensor([[0] * (lp - len(p)) + [1] * (len(p) + len(c)) + [0] * (lc - len(c))
                              for p, c in zip(prompt_ids, completion_ids)], dtype=torch.long)  # [n, lp + lc]
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.long)  # [n]
    cmask = torch.arange(lc).unsqueeze(0) < lengths.unsqueeze(1)  # [n, lc]
    elp = None
    if engine_logprobs is not None:
        elp = torch.tensor([list(lps[: len(c)]) + [0.0] * (lc - len(c)) if c else [0.0] * lc
                            for lps, c in zip(engine_logprobs, completion_ids)], dtype=torch.float32)  # [n, lc]
    empty = torch.zeros((n, lc), dtype=torch.float32)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention, completion_mask=cmask,
                        old_logprobs=empty, entropies=empty.clone(), advantages=advantages.float(),
                        rewards=rewards.float(), engine_logprobs=elp, temperature=temperature)
