"""A small rollout for tests that run real training steps on the tiny model: 4 prompts x 4
responses of 1 to 5 sampled-looking tokens, with group advantages (unscored: old log-probs 0)."""
from __future__ import annotations

import torch


def toy_rollout(model_dir: str):
    from transformers import AutoTokenizer

    from espo_lightning.rollout.advantages import group_advantages
    from espo_lightning.rollout.tensors import build_rollout_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1)
    prompts, completions = [], []
    for p in range(4):
        ids = tok.encode(f"{3 + 17 * p}+{9 * p}=")
        for j in range(4):
            prompts.append(ids)
            completions.append([int(x) for x in torch.randint(3, 13, (1 + (p * 3 + j) % 5,), generator=gen)])
    rewards = torch.rand(len(completions), generator=gen).round()
    return build_rollout_batch(prompts, completions, tok.pad_token_id, group_advantages(rewards, 4), rewards, None, 1.0)


def first_group_varies(prompts, completions, **kw):
    """Rewards 0, 1, 0, 1 for the first 4 completions of each call and 0 after: with 4 samples per
    prompt, exactly one group of every sampling round has reward variance, whatever was sampled."""
    return [float(i % 2) if i < 4 else 0.0 for i in range(len(completions))]
