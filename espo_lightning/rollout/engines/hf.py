"""Rollout engine on transformers ``generate``: batched, left padded, KV cache. It samples from the
policy module itself, so its weights are always current and ``sync_weights`` has nothing to do.

It samples from exactly the distribution the trainer scores (softmax of logits / temperature, then
top-p): the ``GenerationConfig`` is built from ``Sampling`` alone, and the checkpoint's own
``generation_config.json`` (a repetition penalty, n-gram blocking, top-k, min-p, ...) is kept out of
the call, since ``generate`` would otherwise fill every setting left at its default from it."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from espo_lightning.rollout.engines.base import Generation, RolloutEngine, Sampling, stop_token_ids


class HFEngine(RolloutEngine):
    """transformers ``generate`` on the training policy (the fallback where vLLM is absent).

    Args:
        batch_size: Prompts per ``generate`` call (each expands to n sequences); bounds memory.
        return_logprobs: Also return the engine's log-probs of the sampled tokens (from the
            processed scores, so they include temperature and top-p). Costs a [N, V] tensor per step.
    """

    def __init__(self, batch_size: int = 64, return_logprobs: bool = False):
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs
        self.tokenizer = None
        self.stop_ids: list[int] = []

    def setup(self, policy, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(policy, tokenizer)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, policy) -> Generation:
        if self.tokenizer is None:
            raise RuntimeError("HFEngine.generate called before setup(policy, tokenizer)")
        token_ids, truncated, logprobs = [], [], []
        was_training = policy.training
        policy.eval()
        try:
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start : start + self.batch_size]
                seed = None if sampling.seed is None else sampling.seed + start
                out = self._generate_chunk(chunk, sampling, policy, seed)
                token_ids += out.token_ids
                truncated += out.truncated
                logprobs += out.logprobs or []
        finally:
            policy.train(was_training)
        return Generation(token_ids, truncated, logprobs if self.return_logprobs else None)

    def _generate_chunk(self, chunk, sampling: Sampling, policy, seed) -> Generation:
        tok = self.tokenizer
        device = next(policy.parameters()).device
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        kwargs = {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            kwargs["synced_gpus"] = True  # sharded weights: every rank must run the same number of steps
        n = sampling.n
        cache = _shared_prompt_cache(policy, input_ids, attention, n) if n > 1 and width > 1 else None
        if cache is not None:  # each prompt's n samples continue from one prefill of it
            input_ids, attention = input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
            kwargs["past_key_values"] = cache
        config = self._generation_config(sampling, n=1 if cache is not None else n)
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), _without_checkpoint_defaults(policy):
            if seed is not None:
                torch.manual_seed(seed)
            out = policy.generate(input_ids=input_ids, attention_mask=attention, generation_config=config, **kwargs)
        new = out.sequences[:, width:].cpu()  # [N, new_tokens]
        step_logps = None
        if self.return_logprobs:
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [N, new, V]
            step_logps = scores.gather(-1, new.to(scores.device).unsqueeze(-1)).squeeze(-1).cpu()
        token_ids, truncated, logprobs = [], [], []
        stops = set(self.stop_ids)
        for i, row in enumerate(new.tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), None)
            if end is not None:
                n = end + 1  # keep the stop token: the policy is trained to emit it
                truncated.append(False)
            else:
                n = len(row)
                truncated.append(True)
            token_ids.append(row[:n])
            if step_logps is not None:
                logprobs.append(step_logps[i, :n].tolist())
        return Generation(token_ids, truncated, logprobs)

    def _generation_config(self, sampling: Sampling, n: int):
        """Everything ``generate`` does, from ``sampling`` alone: plain (or greedy) sampling at the
        temperature and top-p the trainer scores with, stopping on every stop id; ``n`` sequences
        per input row."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        mode = (dict(do_sample=False) if sampling.greedy else
                dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0))
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
            pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids or tok.eos_token_id,
            return_dict_in_generate=True, output_scores=self.return_logprobs, **mode)


def _shared_prompt_cache(policy, input_ids, attention, n: int):
    """The KV cache of every prompt token but the last, computed once per prompt and repeated for
    its ``n`` samples (None where the model's cache cannot be repeated).

    ``num_return_sequences`` would copy each prompt n times first and prefill every copy: with
    G = 8 that is 8 identical prefills per prompt, most of the work of short completions and all of
    the prompt's share of long ones. The last prompt token is left to ``generate``, which needs an
    uncached token to start from; positions skip left padding, as ``generate`` computes them. Only
    the last position's logits are kept: the prefill's own are never read, and at V = 151,936 all of
    them would be [P, prompt length, V]."""
    from espo_lightning.scoring import position_ids

    out = policy(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1],
                 position_ids=position_ids(attention[:, :-1]), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(n)
    return cache


@contextmanager
def _without_checkpoint_defaults(policy):
    """Hide the checkpoint's generation config during the call: ``generate`` copies every setting
    that the given config leaves at its default (repetition_penalty 1.0, no_repeat_ngram_size 0,
    ...) from the model's own, which would make a checkpoint's ``repetition_penalty: 1.1`` bias every
    importance ratio."""
    from transformers import GenerationConfig

    saved = getattr(policy, "generation_config", None)
    policy.generation_config = GenerationConfig()
    try:
        yield
    finally:
        policy.generation_config = saved
