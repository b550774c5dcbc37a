"""Rollout engine on transformers ``generate``: batched, left padded, KV cache. It samples from the
policy module itself, so its weights are always current and ``sync_weights`` has nothing to do."""
from __future__ import annotations

import torch
import torch.distributed as dist

from espo_lightning.rollout.engines.base import Generation, RolloutEngine, Sampling


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

    def setup(self, policy, tokenizer) -> None:
        self.tokenizer = tokenizer

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
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, num_return_sequences=sampling.n,
                      return_dict_in_generate=True, output_scores=self.return_logprobs)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            kwargs["synced_gpus"] = True  # sharded weights: every rank must run the same number of steps
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            if seed is not None:
                torch.manual_seed(seed)
            out = policy.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        new = out.sequences[:, width:].cpu()  # [N, new_tokens]
        step_logps = None
        if self.return_logprobs:
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [N, new, V]
            step_logps = scores.gather(-1, new.to(scores.device).unsqueeze(-1)).squeeze(-1).cpu()
        token_ids, truncated, logprobs = [], [], []
        for i, row in enumerate(new.tolist()):
            if tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1  # keep the EOS: the policy is trained to emit it
                truncated.append(False)
            else:
                n = len(row)
                truncated.append(True)
            token_ids.append(row[:n])
            if step_logps is not None:
                logprobs.append(step_logps[i, :n].tolist())
        return Generation(token_ids, truncated, logprobs)
