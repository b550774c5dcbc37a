"""The fused LM head: log-probs (and entropies) of the sampled tokens straight from the final hidden
states, without ever holding ``[B, T, V]`` logits.

A causal LM's head turns ``[B, T, H]`` hidden states into ``[B, T, V]`` logits; at V = 151,936 and
16k-token completions that tensor (and its gradient) is far larger than the model's activations.
Here the head's weight is applied to chunks of *valid completion positions only* (``[c, H]`` at a
time): each chunk's logits ``[c, V]`` live just long enough to give ``[c]`` log-probs and entropies,
and the backward recomputes them chunk by chunk, writing the hidden states' gradient ``[N, H]`` and
accumulating the head weight's gradient ``[V, H]`` in fp32. Peak extra memory is one chunk's
logits plus two fp32 ``[c, V]`` buffers, whatever V x T is (``benchmarks/train_step_memory.py``).

How the hidden states are reached: the model is called as usual (so FSDP2's root hooks all-gather
the head, embeddings and final norm, gradient checkpointing and attention work unchanged), with the
head's ``forward`` swapped for the duration of the call. The model hands the head its final hidden
states, the swapped forward returns ``[B, Lc]`` log-probs in place of logits, and the model returns
them as ``output.logits``. The weight saved for the backward is the one FSDP2 unsharded for the
forward; FSDP2's pre-backward hook on the model's output unshards it again before the backward.

A model whose head is not a plain ``nn.Linear`` over the final hidden states (logit soft-capping,
logit scaling, a quantised head) cannot be fused: ``fusion_blocker`` names the reason up front, and a
model that post-processes the head's output anyway is caught at run time (its output is not the
tensor the swapped head returned). Either way ``espo_lightning.policy.scoring`` falls back to the logits
path and logs one line saying so.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from espo_lightning.policy.logprobs import chunk_logprobs_and_entropy, shifted_logits

# Config attributes of models that transform the head's logits before returning them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling")


def fusion_blocker(model) -> str | None:
    """Why the fused head cannot be used on ``model``, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return f"{type(model).__name__} exposes no output embeddings (get_output_embeddings)"
    if type(head) is not torch.nn.Linear:  # subclasses include quantised layers with int weights
        return f"its LM head is a {type(head).__name__}, not a torch.nn.Linear"
    if not head.weight.is_floating_point():
        return f"its LM head weight is {head.weight.dtype}"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"its config sets {name}={value!r} (the logits are transformed after the head)"
    return None


def _compute_dtype(weight: Tensor, autocast: tuple[bool, torch.dtype]) -> torch.dtype:
    enabled, dtype = autocast
    return dtype if enabled and weight.is_floating_point() else weight.dtype


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and gradient accumulation: fp32, or fp64 for an fp64 model."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Chunks:
    """The per-chunk buffers of a pass over N positions, allocated once and reused by every chunk:
    a fresh ``[c, V]`` tensor per chunk costs as much in page faults on a CPU as its arithmetic.

    ``logits`` holds a chunk's logits in the compute dtype; ``z`` the fp32 (fp64) softmax statistics
    buffer, the same storage as ``logits`` when the compute dtype is already fp32; ``e`` a second
    statistics buffer (entropies only)."""

    def __init__(self, n: int, rows: int, weight: Tensor, dtype: torch.dtype, with_entropy: bool = False):
        rows = max(1, min(rows, n))
        vocab, stats = weight.shape[0], _stats_dtype(dtype)
        self.logits = torch.empty(rows, vocab, dtype=dtype, device=weight.device)
        self.z = self.logits if dtype == stats else torch.empty(rows, vocab, dtype=stats, device=weight.device)
        self.e = torch.empty(rows, vocab, dtype=stats, device=weight.device) if with_entropy else None

    def logits_of(self, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """``h W^T + b`` into the logits buffer: ``[c, V]``."""
        out = torch.mm(h, w.t(), out=self.logits[: h.shape[0]])
        return out if b is None else out.add_(b)

    def stats(self, h, w, b, targets, temperature, with_entropy):
        c = h.shape[0]
        return chunk_logprobs_and_entropy(self.logits_of(h, w, b), targets, temperature, with_entropy,
                                          out=self.z[:c], scratch=None if self.e is None else self.e[:c])


class _FusedHeadLogprobs(torch.autograd.Function):
    """``log_softmax(h W^T + b) / tau)[target]`` for ``[N, H]`` hidden states, chunked over N, and
    with ``with_entropy`` the entropies ``[N]`` of the same chunks (no gradient): the first update
    of a rollout is on-policy, and its pass gives the old policy's statistics without a pass of
    their own (``PolicyModule.training_step``).

    The logits of a chunk are computed in the compute dtype a plain ``nn.Linear`` would use (the
    autocast dtype under autocast, else the weight's dtype); softmax statistics are fp32. The
    backward recomputes each chunk's logits under the same dtype and accumulates the weight's
    gradient in fp32."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                rows: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        autocast = _autocast_state(hidden.device.type)
        dtype = _compute_dtype(weight, autocast)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=_stats_dtype(dtype), device=hidden.device)  # [N]
        entropy = torch.empty(n if with_entropy else 0, dtype=logp.dtype, device=hidden.device)  # [N] or [0]
        buffers = _Chunks(n, rows, weight, dtype, with_entropy=with_entropy)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            lp, ent = buffers.stats(hidden[sl].to(dtype), w, b, targets[sl], temperature, with_entropy)
            logp[sl] = lp
            if with_entropy:
                entropy[sl] = ent
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor | None):
        hidden, weight, bias, targets = ctx.saved_tensors
        tau, rows, dtype = ctx.temperature, ctx.rows, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        acc = _stats_dtype(dtype)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None  # [V]
        product = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w and dtype != acc else None
        grad_logp = grad_logp.to(acc)
        buffers = _Chunks(n, rows, weight, dtype)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            h = hidden[sl].to(dtype)  # [c, H]
            c = h.shape[0]
            # d logp(target) / d logit_j = (onehot_j(target) - softmax_j(logits / tau)) / tau
            g = grad_logp[sl].unsqueeze(-1) / tau  # [c, 1]
            d = shifted_logits(buffers.logits_of(h, w, b), tau, out=buffers.z[:c]).exp_()  # [c, V] unnormalised
            d.mul_(-g / d.sum(-1, keepdim=True)).scatter_add_(-1, targets[sl].unsqueeze(-1), g)
            if grad_b is not None:
                grad_b += d.sum(0)
            if dtype != acc:
                d = buffers.logits[:c].copy_(d)  # the gradient of the logits in the compute dtype
            if grad_h is not None:
                grad_h[sl] = (d @ w).to(hidden.dtype)
            if grad_w is not None:
                # One rounding per chunk in the compute dtype (as nn.Linear's backward rounds once),
                # summed in fp32; in fp32 the product is accumulated in place.
                if product is None:
                    grad_w.addmm_(d.t(), h)
                else:
                    grad_w.add_(torch.mm(d.t(), h, out=product))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


@contextmanager
def _swapped_forward(module: torch.nn.Module, forward: Callable):
    """Shadow ``module.forward`` for the duration of a call (restoring an instance-level forward,
    e.g. one installed by accelerate hooks, if there was one)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class HeadNotReached(RuntimeError):
    """The model transformed the swapped head's output (or never called the head)."""


def fused_completion_stats(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                           completion_mask: Tensor, temperature: float, rows: int,
                           with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, Lc]`` (fp32, differentiable where grad is enabled) of the completion tokens,
    and with ``with_entropy`` the entropies ``[B, Lc]`` (no gradient) from the same logits; 0 off
    ``completion_mask``. The log-probs are bit-identical with and without grad or entropies.

    Only the valid completion positions reach the head. Raises ``HeadNotReached`` when the model
    does not return the swapped head's output unchanged."""
    head = model.get_output_embeddings()
    lc = completion_mask.shape[1]
    targets = input_ids[:, -lc:][completion_mask]  # [N]
    where = completion_mask.nonzero(as_tuple=True)  # ([N], [N])
    result: dict[str, Tensor] = {}

    def head_forward(hidden: Tensor) -> Tensor:  # [B, Lc + 1, H] -> [B, Lc]
        h = hidden[:, :-1][where]  # [N, H] the positions that predict valid completion tokens
        logp, entropy = _FusedHeadLogprobs.apply(h, head.weight, head.bias, targets, float(temperature), rows,
                                                 with_entropy)
        if with_entropy:
            result["entropy"] = entropy.new_zeros(completion_mask.shape).index_put_(where, entropy)
        result["logp"] = logp.new_zeros(completion_mask.shape).index_put(where, logp)  # [B, Lc]
        return result["logp"]

    with _swapped_forward(head, head_forward):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=lc + 1, use_cache=False)
    if "logp" not in result or out.logits is not result["logp"]:
        raise HeadNotReached(f"{type(model).__name__} post-processes its LM head's output")
    return result["logp"], result.get("entropy")


def fused_packed_stats(model, packed, completion_shape: torch.Size, temperature: float, rows: int,
                       with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """``fused_completion_stats`` for a padding-free micro-batch (``espo_lightning.policy.packing``):
    the model runs on ``packed``'s ``[1, N]`` sequence, only the hidden states at ``packed.keep`` reach
    the head (``logits_to_keep``), and the log-probs ``[B, Lc]`` (and entropies) come back scattered
    to ``completion_shape``, 0 off the completion mask."""
    from espo_lightning.policy.packing import packed_call

    head = model.get_output_embeddings()
    result: dict[str, Tensor] = {}

    def head_forward(hidden: Tensor) -> Tensor:  # [1, Nv, H] -> [B, Lc]
        logp, entropy = _FusedHeadLogprobs.apply(hidden[0], head.weight, head.bias, packed.targets,
                                                 float(temperature), rows, with_entropy)
        if with_entropy:
            result["entropy"] = packed.scatter(entropy, completion_shape)
        result["logp"] = packed.scatter(logp, completion_shape)
        return result["logp"]

    with _swapped_forward(head, head_forward), packed_call():
        out = model(**packed.model_kwargs(), logits_to_keep=packed.keep)
    if "logp" not in result or out.logits is not result["logp"]:
        raise HeadNotReached(f"{type(model).__name__} post-processes its LM head's output")
    return result["logp"], result.get("entropy")
