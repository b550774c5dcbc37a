"""Packing prompt and completion token lists into a padded ``RolloutBatch``."""
from __future__ import annotations

import torch

from espo_lightning.rollout.batch import RolloutBatch


def build_rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        advantages: torch.Tensor, rewards: torch.Tensor,
                        engine_logprobs: list[list[float]] | None, temperature: float) -> RolloutBatch:
    """Prompts left padded to Lp, completions right padded to Lc (at least 1 column, so an empty
    completion still yields a valid [B, 1] tensor with its mask all False)."""
    n = len(prompt_ids)
    lp = max(len(p) for p in prompt_ids)
    lc = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((n, lp + lc), pad_id, dtype=torch.long)
    attention = torch.zeros((n, lp + lc), dtype=torch.long)
    cmask = torch.zeros((n, lc), dtype=torch.bool)
    elp = torch.zeros((n, lc), dtype=torch.float32) if engine_logprobs is not None else None
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, lp - len(p) : lp] = torch.tensor(p, dtype=torch.long)
        attention[i, lp - len(p) : lp] = 1
        if c:
            input_ids[i, lp : lp + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[i, lp : lp + len(c)] = 1
            cmask[i, : len(c)] = True
            if elp is not None:
                elp[i, : len(c)] = torch.tensor(engine_logprobs[i], dtype=torch.float32)
    empty = torch.zeros((n, lc), dtype=torch.float32)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention, completion_mask=cmask,
                        old_logprobs=empty, entropies=empty.clone(), advantages=advantages.float(),
                        rewards=rewards.float(), engine_logprobs=elp, temperature=temperature)
