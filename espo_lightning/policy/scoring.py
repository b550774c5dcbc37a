"""Forward passes of the policy (or reference) over rollout sequences: per-token log-probs of the
sampled completion tokens, and the old policy's entropies.

``TokenScorer`` is what the trainer uses: it goes through the fused LM head
(``espo_lightning.policy.lm_head``: no ``[B, T, V]`` logits, only valid completion positions reach the
head) and falls back to the logits path below for a model whose head it cannot reach, with one log
line. The logits path keeps only the completion positions' logits (``logits_to_keep``) and runs
log-softmax in chunks (``espo_lightning.policy.logprobs``)."""
from __future__ import annotations

import logging

import torch

from espo_lightning.policy.lm_head import HeadNotReached, fused_completion_stats, fused_packed_stats, fusion_blocker
from espo_lightning.policy.logprobs import CHUNK_ELEMENTS, token_logprobs, token_logprobs_and_entropy

log = logging.getLogger(__name__)


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
                      chunk_size: int | None) -> torch.Tensor:
    """Log-prob (with grad) of each completion token under ``model``, logits path: ``[B, Lc]`` float32."""
    logits = completion_logits(model, input_ids, attention_mask, completion_len)
    return token_logprobs(logits, input_ids[:, -completion_len:], temperature=temperature, chunk_size=chunk_size)


@torch.no_grad()
def sequence_logprobs_and_entropy(model, input_ids, attention_mask, completion_len: int, temperature: float,
                                  chunk_size: int | None, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring without grad in micro-batches, logits path: log-probs and entropies, ``[B, Lc]`` each."""
    logps, ents = [], []
    for start in range(0, input_ids.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        logits = completion_logits(model, input_ids[sl], attention_mask[sl], completion_len)
        lp, ent = token_logprobs_and_entropy(logits, input_ids[sl, -completion_len:], temperature=temperature,
                                             chunk_size=chunk_size)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)


class TokenScorer:
    """Log-probs (and entropies) of completion tokens through the fused head, else the logits path.

    Args:
        chunk_size: token positions per chunk of ``[c, V]`` logits (both paths); None: 2**26 / V
            (256 MiB per fp32 chunk).
        fused_head: try the fused LM head first; False always uses the logits path.
        packing: run each micro-batch padding-free as one ``[1, N]`` sequence
            (``espo_lightning.policy.packing``); the results are the same ``[B, Lc]`` tensors.
    """

    def __init__(self, chunk_size: int | None = None, fused_head: bool = True, packing: bool = False) -> None:
        self.chunk_size = chunk_size
        self.fused_head = fused_head
        self.packing = packing
        self._packable: set[int] = set()  # id(model) of models prepared for packed input
        self._blocked: dict[int, str] = {}  # id(model) -> why it cannot be fused

    def _fusable(self, model) -> bool:
        if not self.fused_head:
            return False
        key = id(model)
        if key not in self._blocked:
            reason = fusion_blocker(model)
            self._blocked[key] = reason or ""
            if reason:
                self._log_fallback(model, reason)
        return not self._blocked[key]

    def _log_fallback(self, model, reason: str) -> None:
        self._blocked[id(model)] = reason
        log.warning("fused LM head off for %s: %s; computing log-probs from [B, T, V] logits instead "
                    "(more memory: see docs/memory.md)", type(model).__name__, reason)

    def _rows(self, model) -> int:
        return self.chunk_size or max(1, CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])

    def _fused(self, model, batch, with_entropy: bool, packed=None):
        try:
            if packed is not None:
                return fused_packed_stats(model, packed, batch.completion_mask.shape, batch.temperature,
                                          self._rows(model), with_entropy)
            return fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                          position_ids(batch.attention_mask), batch.completion_mask,
                                          batch.temperature, self._rows(model), with_entropy)
        except HeadNotReached as err:
            self._log_fallback(model, str(err))
            return None

    def logprobs(self, model, batch) -> torch.Tensor:
        """Differentiable log-probs ``[B, Lc]`` (fp32) of ``batch``'s completion tokens; 0 off-mask
        on the fused path (the losses ignore off-mask values)."""
        return self.logprobs_with_entropy(model, batch, with_entropy=False)[0]

    def logprobs_with_entropy(self, model, batch,
                              with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable log-probs ``[B, Lc]`` and, with ``with_entropy``, the entropies ``[B, Lc]``
        (no gradient) from the same forward pass: the first, on-policy update of a rollout takes the
        old policy's statistics from its own pass. Both are bit-identical to ``logprobs_and_entropy``."""
        if self.packing:
            return self._packed(model, batch, with_entropy)
        if self._fusable(model):
            out = self._fused(model, batch, with_entropy=with_entropy)
            if out is not None:
                return out
        lc = batch.completion_mask.shape[1]
        logits = completion_logits(model, batch.input_ids, batch.attention_mask, lc)
        targets = batch.input_ids[:, -lc:]
        logp = token_logprobs(logits, targets, temperature=batch.temperature, chunk_size=self.chunk_size)
        if not with_entropy:
            return logp, None
        entropy = token_logprobs_and_entropy(logits.detach(), targets, temperature=batch.temperature,
                                             chunk_size=self.chunk_size)[1]
        return logp, entropy

    @torch.no_grad()
    def logprobs_and_entropy(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies ``[B, Lc]`` (fp32) without grad, in one pass over ``batch``."""
        if self.packing:
            return self._packed(model, batch, with_entropy=True)
        if self._fusable(model):
            out = self._fused(model, batch, with_entropy=True)
            if out is not None:
                return out
        lc = batch.completion_mask.shape[1]
        return sequence_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, lc, batch.temperature,
                                             self.chunk_size, max(1, batch.input_ids.shape[0]))

    def _packed(self, model, batch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both paths on ``batch`` packed padding-free: the same operations on the valid completion
        positions only, scattered back to ``[B, Lc]`` (0 off the completion mask)."""
        from espo_lightning.policy.packing import pack, packed_call, prepare_for_packing

        if id(model) not in self._packable:  # PolicyModule.configure_model has done it already
            prepare_for_packing(model)
            self._packable.add(id(model))
        packed = pack(batch.input_ids, batch.attention_mask, batch.completion_mask)
        shape = batch.completion_mask.shape
        if self._fusable(model):
            out = self._fused(model, batch, with_entropy=with_entropy, packed=packed)
            if out is not None:
                return out
        with packed_call():
            logits = model(**packed.model_kwargs(), logits_to_keep=packed.keep).logits  # [1, Nv, V]
        targets = packed.targets.unsqueeze(0)  # [1, Nv]
        logp = token_logprobs(logits, targets, temperature=batch.temperature, chunk_size=self.chunk_size)[0]
        if not with_entropy:
            return packed.scatter(logp, shape), None
        entropy = token_logprobs_and_entropy(logits.detach(), targets, temperature=batch.temperature,
                                             chunk_size=self.chunk_size)[1][0]
        return packed.scatter(logp, shape), packed.scatter(entropy, shape)
