"""Log-probabilities (and entropies) of sampled tokens from logits, without full fp32 copies.

A ``[B, T, V]`` logits tensor is large (V = 151,936 for Qwen: 0.6 GB per 2,048 tokens in bf16), and
the naive ``logits.float().log_softmax(-1)`` plus an entropy needs about three more full fp32
tensors. Both functions here walk over chunks of rows (token positions), upcast one chunk at a time
to fp32 and keep only ``[B, T]`` results:

- ``token_logprobs_and_entropy`` (no grad): the old policy's log-probs and entropies, computed once
  per rollout; peak extra memory is two fp32 chunks.
- ``token_logprobs`` (with grad): the current policy's log-probs for the loss, checkpointed per
  chunk: the forward keeps no fp32 intermediates and the backward recomputes them one chunk at a
  time, writing into a single logits-sized gradient.

Temperature: the logits are divided by the sampling temperature before the softmax, so the numbers
refer to the distribution the rollout engine actually sampled from.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements of one chunk; 2**26 fp32 values = 256 MiB, i.e. 441 rows at V = 151,936. Large enough
# that the Python loop costs little on a GPU, small enough to stay well below the logits' own size.
CHUNK_ELEMENTS = 2**26


def _check(logits: Tensor, targets: Tensor, temperature: float, chunk_size: int | None) -> int:
    """Validate the arguments; return the number of rows per chunk."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, T, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be in (0, inf), got {temperature!r}")
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (rows per chunk) or None, got {chunk_size!r}")
    return chunk_size


def _row_chunks(rows: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Matching chunks (views) of ``[B, T, ...]`` tensors, ``rows`` positions each, row-major order.

    Flattened over (B, T) when every tensor allows a view, else per response (e.g. logits that are a
    ``[:, a:b]`` slice of prompt + completion logits). Views matter: outputs are written through them,
    and no input gets copied."""
    try:
        flat = [t.view(-1, *t.shape[2:]) for t in tensors]
    except RuntimeError:
        per_response = zip(*(t.unbind(0) for t in tensors))
        return [piece for row in per_response for piece in zip(*(t.split(rows) for t in row))]
    return list(zip(*(t.split(rows) for t in flat)))


def shifted_logits(chunk: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """``(chunk - max) / temperature`` as a new fp32 (fp64 for fp64 logits) ``[c, V]`` buffer (the
    only full-chunk one), or written into ``out`` (which may be ``chunk`` itself when it already has
    that dtype: then the shift is in place).

    Copy-then-subtract in place: a mixed-dtype ``bf16 - fp32`` would first build an fp32 copy of its
    input and then a second buffer for the result. The shift keeps ``exp`` in range. -inf logits (a
    masked vocabulary) are clamped to the most negative finite value: probability 0 either way, but
    no ``0 * -inf = NaN`` in the entropy."""
    if out is None:
        z = chunk.to(torch.promote_types(chunk.dtype, torch.float32), copy=True)  # [c, V] a fresh buffer
    else:
        z = out if out.data_ptr() == chunk.data_ptr() else out.copy_(chunk)
    z.sub_(z.amax(-1, keepdim=True))  # <= 0
    if temperature != 1.0:
        z.div_(temperature)
    return z.clamp_min_(torch.finfo(z.dtype).min)


def chunk_logprobs_and_entropy(chunk: Tensor, targets: Tensor, temperature: float, with_entropy: bool = True,
                               out: Tensor | None = None, scratch: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """fp32 log-prob of ``targets`` and entropy (nats, or None) for one ``[c, V]`` chunk of logits.

    Every path (no-grad scoring, the differentiable policy pass, logits or fused head) computes the
    log-prob with these same operations, so the old policy's log-probs and the first on-policy pass's
    are bit-identical. Two fp32 buffers with the entropy, one without; ``out`` / ``scratch`` (``[c, V]``
    fp32) are used for them when given (``out`` may be ``chunk``), so a loop over chunks can reuse
    two buffers instead of allocating (and page-faulting) fresh ones for every chunk."""
    z = shifted_logits(chunk, temperature, out)  # [c, V]
    z_target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [c]
    if not with_entropy:
        e = z.exp_()
    else:
        e = torch.exp(z) if scratch is None else torch.exp(z, out=scratch)  # [c, V]
    total = e.sum(-1)  # [c]
    lse = torch.log(total)  # [c] log-sum-exp of z
    if not with_entropy:
        return z_target - lse, None
    # H = -sum p log p = lse - sum p z with p = e / total (in place: no third buffer).
    entropy = lse - e.mul_(z).sum(-1) / total
    return z_target - lse, entropy


@torch.no_grad()
def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probs ``[B, T]`` (fp32) of ``targets`` and entropies ``[B, T]`` (fp32, nats) from ``logits``.

    Args:
        logits: ``[B, T, V]`` logits in any float dtype, position t scoring ``targets[:, t]``.
        targets: ``[B, T]`` token ids.
        temperature: sampling temperature the logits are divided by; > 0.
        chunk_size: rows (token positions) per fp32 chunk; None picks 2**26 / V rows (256 MiB).
    """
    rows = _check(logits, targets, temperature, chunk_size)
    logp = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)  # [B, T]
    entropy = torch.empty_like(logp)  # [B, T]
    for chunk, tgt, logp_out, entropy_out in _row_chunks(rows, logits, targets.long(), logp, entropy):
        logp_out[:], entropy_out[:] = chunk_logprobs_and_entropy(chunk, tgt, temperature)
    return logp, entropy


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Per-chunk checkpointing of ``log_softmax(logits / tau)[target]``, written out by hand.

    The forward saves only the logits (a reference, not a copy); the backward recomputes each
    chunk's softmax in fp32 and writes that chunk's gradient straight into one logits-sized
    gradient. ``torch.utils.checkpoint`` over ``split`` chunks would also avoid whole fp32 copies,
    but its backward holds every chunk's gradient until the split's backward concatenates them: two
    logits-sized gradients instead of one (``benchmarks/logprob_memory.py`` measured 2.0x the fp32
    logits' size for that, 1.2x for this)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, rows: int) -> Tensor:
        logp = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)  # [B, T]
        for chunk, tgt, out in _row_chunks(rows, logits, targets, logp):
            out[:] = chunk_logprobs_and_entropy(chunk, tgt, temperature, with_entropy=False)[0]
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.rows = temperature, rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        logits, targets = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [B, T, V]
        grad_logp = grad_logp.contiguous()  # [B, T] (an expanded scalar gradient has stride 0)
        for chunk, tgt, g, grad_chunk in _row_chunks(ctx.rows, logits, targets, grad_logp, grad):
            # d logp(target) / d logit_j = (onehot_j(target) - softmax_j(logits / tau)) / tau
            probs = shifted_logits(chunk, temperature).exp_()  # [c, V] unnormalised, in place
            g = g.to(probs.dtype).unsqueeze(-1) / temperature  # [c, 1] fp32 (fp64 for fp64 logits)
            probs.mul_(-g / probs.sum(-1, keepdim=True))  # -softmax * g / tau
            grad_chunk.copy_(probs.scatter_add_(-1, tgt.unsqueeze(-1), g))
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Differentiable log-probs ``[B, T]`` (fp32) of ``targets`` under ``logits`` ``[B, T, V]``.

    Args:
        logits: ``[B, T, V]`` logits in any float dtype, position t scoring ``targets[:, t]``.
        targets: ``[B, T]`` token ids.
        temperature: sampling temperature the logits are divided by; > 0.
        chunk_size: rows (token positions) per fp32 chunk; None picks 2**26 / V rows (256 MiB).
    """
    rows = _check(logits, targets, temperature, chunk_size)
    return _ChunkedTokenLogprobs.apply(logits, targets.long(), float(temperature), rows)
