"""Forward passes of the policy (or reference) over rollout sequences: per-token log-probs of the
sampled completion tokens, and the old policy's entropies. Only the completion positions' logits
are materialised (``logits_to_keep``), and log-softmax runs in chunks (``espo_lightning.logprobs``)."""
from __future__ import annotations

import torch

from espo_lightning.logprobs import token_logprobs, token_logprobs_and_entropy


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them; a plain arange would shift every
    left-padded prompt and score the tokens under a different model than the one that sampled them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def completion_logits(model, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
    """Logits that predict the last ``completion_len`` tokens: ``[B, Lc, V]``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=completion_len + 1, use_cache=False)
    return out.logits[:, :-1]


def sequence_logprobs(model, input_ids, attention_mask, completion_len: int, temperature: float,
                      chunk_size: int) -> torch.Tensor:
    """Log-prob (with grad) of each completion token under ``model``: ``[B, Lc]`` float32."""
    logits = completion_logits(model, input_ids, attention_mask, completion_len)
    return token_logprobs(logits, input_ids[:, -completion_len:], temperature=temperature, chunk_size=chunk_size)


@torch.no_grad()
def sequence_logprobs_and_entropy(model, input_ids, attention_mask, completion_len: int, temperature: float,
                                  chunk_size: int, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Old-policy scoring without grad in micro-batches: log-probs and entropies, ``[B, Lc]`` each."""
    logps, ents = [], []
    for start in range(0, input_ids.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        logits = completion_logits(model, input_ids[sl], attention_mask[sl], completion_len)
        lp, ent = token_logprobs_and_entropy(logits, input_ids[sl, -completion_len:], temperature=temperature,
                                             chunk_size=chunk_size)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)
