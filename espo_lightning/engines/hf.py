"""Rollout engine on transformers ``generate``: batched, left padded, KV cache. It samples from the
policy module itself, so its weights are always current and ``sync_weights`` has nothing to do.

It samples from exactly the distribution the trainer scores (softmax of logits / temperature, then
top-p): the ``GenerationConfig`` is built from ``Sampling`` alone, and the checkpoint's own
``generation_config.json`` (a repetition penalty, n-gram blocking, top-k, min-p, ...) is kept out of
the call, since ``generate`` would otherwise fill every setting left at its default from it.

With n > 1 samples per prompt, each prompt is prefilled once and its samples' first tokens are drawn
from that pass (``hf_prefill``); ``generate`` continues on the repeated KV cache."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from espo_lightning.engines.base import Generation, RolloutEngine, Sampling, stop_token_ids
from espo_lightning.engines.hf_prefill import SharedPrefill, first_token, stopped_before


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
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        kwargs = {"synced_gpus": True} if synced else {}  # sharded weights: every rank runs the same steps
        n = sampling.n
        prefill = SharedPrefill.of(policy, input_ids, attention, n) if n > 1 else None
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), _without_checkpoint_defaults(policy):
            if seed is not None:
                _seed(seed, device)
            if prefill is None:
                out = policy.generate(input_ids=input_ids, attention_mask=attention,
                                      generation_config=self._generation_config(sampling, n, sampling.max_new_tokens),
                                      **kwargs)
                sequences, scores = out.sequences, out.scores
            else:
                sequences, scores = self._continue(prefill, input_ids, attention, sampling, policy, synced, kwargs)
        new = sequences[:, width:].cpu()  # [N, new_tokens]
        step_logps = None
        if self.return_logprobs:
            scores = torch.stack(scores, dim=1).float().log_softmax(-1)  # [N, new, V]
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

    def _continue(self, prefill: SharedPrefill, input_ids, attention, sampling: Sampling, policy, synced: bool,
                  kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each prompt's n samples from one prefill of it: the first token is drawn from the
        prefill's last logits (``hf_prefill.first_token``, as ``generate``'s first step draws it),
        ``generate`` samples the rest on the repeated KV cache. Returns the sequences ``[N, width +
        new]`` and the processed scores of each step (what ``output_scores`` gives)."""
        n = sampling.n
        first, first_scores = first_token(prefill.logits, sampling, n)
        input_ids = torch.cat([input_ids.repeat_interleave(n, 0), first[:, None]], dim=1)
        attention = torch.cat([attention.repeat_interleave(n, 0), torch.ones_like(first)[:, None]], dim=1)
        stopped = torch.isin(first, torch.tensor(self.stop_ids, dtype=torch.long, device=first.device))
        # Under synced_gpus every rank must call generate, whatever its own rows did.
        if sampling.max_new_tokens == 1 or (not synced and bool(stopped.all())):
            return input_ids, (first_scores,)
        out = policy.generate(input_ids=input_ids, attention_mask=attention, past_key_values=prefill.cache,
                              generation_config=self._generation_config(sampling, 1, sampling.max_new_tokens - 1),
                              stopping_criteria=stopped_before(stopped), **kwargs)
        return out.sequences, (first_scores,) + tuple(out.scores or ())

    def _generation_config(self, sampling: Sampling, n: int, max_new_tokens: int):
        """Everything ``generate`` does, from ``sampling`` alone: plain (or greedy) sampling at the
        temperature and top-p the trainer scores with, stopping on every stop id; ``n`` sequences
        per input row, ``max_new_tokens`` new tokens at most."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        mode = (dict(do_sample=False) if sampling.greedy else
                dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0))
        return GenerationConfig(
            max_new_tokens=max_new_tokens, num_return_sequences=n,
            pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids or tok.eos_token_id,
            return_dict_in_generate=True, output_scores=self.return_logprobs, **mode)


def _seed(seed: int, device: torch.device) -> None:
    """Seed the generator ``generate`` samples from: the CPU's for a policy on the CPU (the stream
    ``torch.manual_seed`` would set). Not ``torch.manual_seed`` there: it also queues a seed for
    every backend that is not initialised (CUDA, XPU, MTIA), each with a formatted stack trace, about
    1 ms per rollout deep in the training loop, and fork_rng restores only the CPU's state."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


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
