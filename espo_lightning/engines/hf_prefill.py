"""The HF engine's shared prefill: each prompt is run through the model once for its n samples, and
their first tokens are drawn from that one pass.

``num_return_sequences`` would copy each prompt n times first and prefill every copy: with G = 8
that is 8 identical prefills per prompt. Here the P prompts are prefilled once; their KV cache is
repeated for the N = P * n samples and the last position's logits give every sample's first token,
drawn as ``generate``'s own first step draws it (same processors, one ``multinomial`` over the N
rows at the same point of the random stream). ``generate`` then continues from the second token.
Leaving the last prompt token to ``generate`` instead (so that it has an uncached token to start
from) costs a whole extra forward over the N rows per call: a quarter of decoding at 4 new tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from espo_lightning.engines.base import Sampling


@dataclass
class SharedPrefill:
    cache: object  # the prompts' KV cache, each prompt's repeated n times (rows prompt-major)
    logits: torch.Tensor  # [P, V] float32: the last prompt position's logits, once per prompt

    @classmethod
    def of(cls, policy, input_ids: torch.Tensor, attention: torch.Tensor, n: int) -> SharedPrefill | None:
        """One forward over the left-padded prompts (None where the model's cache cannot be
        repeated). Positions skip the left padding, as ``generate`` computes them; only the last
        position's logits are kept (all of them would be ``[P, prompt length, V]`` at V = 151,936)."""
        from espo_lightning.policy.scoring import position_ids

        out = policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention),
                     use_cache=True, logits_to_keep=1)
        cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(n)
        # float32 copy, as generate takes each step's logits before its processors
        return cls(cache, out.logits[:, -1].to(copy=True, dtype=torch.float32))


def processed_scores(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The scores ``generate`` samples from, for the ``GenerationConfig`` the engine builds: greedy
    takes the raw logits; sampling divides by the temperature (unless 1) and masks outside top-p
    (unless 1), with transformers' own processors in generate's order (top-k is 0: off)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    return processors(None, logits)  # these processors never read the input ids


def first_token(logits: torch.Tensor, sampling: Sampling, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's first token ``[P * n]`` and its processed scores ``[P * n, V]``, from the
    prompts' last logits ``[P, V]``: processed once per prompt (row-wise), repeated for its n
    samples, then one ``multinomial`` draw over all rows (argmax when greedy), as ``generate``'s
    first step makes it. Call it where ``generate``'s first draw would be: right after the seed."""
    scores = processed_scores(logits, sampling).repeat_interleave(n, 0)
    if sampling.greedy:
        return scores.argmax(-1), scores
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1), scores


def stopped_before(stopped: torch.Tensor):
    """Stopping criteria for rows whose first token already was a stop token: ``generate`` only
    checks the tokens it samples itself and would run those rows to ``max_new_tokens``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StoppedBefore(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            return stopped

    return StoppingCriteriaList([StoppedBefore()])
