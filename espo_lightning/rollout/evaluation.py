"""Validation: greedy completions of held-out prompts, scored by the accuracy reward.

Rows are sharded over ranks by position; every rank runs the same number of steps (sharded
generation is a collective), so a rank short of rows repeats one with weight 0 and the global
accuracy is over the real rows only."""
from __future__ import annotations

import math

import torch

from espo_lightning.rollout.engines.base import Sampling
from espo_lightning.rollout.prompts import completions_for_rewards


def validation_chunks(rows: list[dict], rank: int, world: int, batch_size: int) -> list[list[dict]]:
    """This rank's rows in chunks of ``batch_size``, padded with weight-0 repeats to the same count
    of rows on every rank."""
    per_rank = math.ceil(len(rows) / world)
    mine = rows[rank::world]
    mine = mine + [{**rows[0], "_weight": 0.0}] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def evaluate_rows(rows: list[dict], *, encoder, engine, policy, tokenizer, rewarder, max_new_tokens: int,
                  precision_context) -> tuple[torch.Tensor, torch.Tensor]:
    """(1.0 where the accuracy reward calls the greedy completion correct, row weight), per row."""
    prompts = [r["prompt"] for r in rows]
    encoded = encoder.encode(prompts)
    with precision_context():
        gen = engine.generate(encoded.ids, Sampling(n=1, greedy=True, max_new_tokens=max_new_tokens), policy)
    texts = tokenizer.batch_decode(gen.token_ids, skip_special_tokens=True)
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "_weight")}
    columns["completion_ids"] = gen.token_ids
    correct = rewarder.correct(prompts, completions_for_rewards(prompts, texts), columns)
    return torch.tensor(correct), torch.tensor([r.get("_weight", 1.0) for r in rows])
