"""Padding-free forwards (``model.packing``): a micro-batch's rows concatenated into one sequence.

A padded micro-batch is ``[B, T]`` with left-padded prompts and right-padded completions; every pad
position still goes through the MLPs and attention. Packed, the real tokens of each row are laid
end to end in one ``[1, N]`` sequence (N = the micro-batch's real tokens), with position ids that
restart at 0 on every row (exactly the positions ``scoring.position_ids`` gives the padded rows), and
the rows' boundaries (``cu_seq_lens``) travel as keyword arguments to every attention call:

- ``flash_attention_2`` / ``_3``: transformers' varlen kernels take ``cu_seq_lens_q/k`` directly.
- ``sdpa``: the model's attention is switched to ``espo_packed_sdpa`` (registered here): on a packed
  call it runs causal SDPA on each row's slice of the sequence, so no ``[N, N]`` mask is built and no
  attention is computed across rows; on any other call (generation, an unpacked forward) it is
  transformers' SDPA with transformers' mask, unchanged.
- ``eager`` / ``flex_attention``: transformers' own packed-sequence mask, built from the position ids
  (``masking_utils.find_packed_sequence_indices``): a block-diagonal causal mask (dense for eager).

Only the hidden states that predict valid completion tokens reach the LM head (``logits_to_keep`` is
a tensor of their packed indices); their log-probs and entropies are scattered back to the ``[B, Lc]``
tensors the losses take. ``packing_blocker`` names a model whose attention cannot take packed input."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

PACKED_SDPA = "espo_packed_sdpa"
NATIVE = ("flash_attention_2", "flash_attention_3", "eager", "flex_attention")  # packed input as transformers does
SUPPORTED = ("sdpa", PACKED_SDPA) + NATIVE

_packed_call: ContextVar[bool] = ContextVar("espo_packed_call", default=False)


@dataclass
class PackedRows:
    """A micro-batch laid out padding-free.

    Shapes: N real tokens in all, R rows, Nv valid completion tokens (``completion_mask``)."""

    input_ids: Tensor  # [1, N] long
    position_ids: Tensor  # [1, N] long, 0..n_r - 1 on every row
    cu_seq_lens: Tensor  # [R + 1] int32, row r spans [cu[r], cu[r + 1])
    max_length: int  # longest row
    keep: Tensor  # [Nv] long, packed index of the hidden state that predicts each valid completion token
    targets: Tensor  # [Nv] long, the valid completion tokens
    where: tuple[Tensor, Tensor]  # ([Nv], [Nv]) their (row, column) in the [B, Lc] completion tensors

    def model_kwargs(self) -> dict:
        cu = self.cu_seq_lens
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.max_length,
                "max_length_k": self.max_length, "use_cache": False}

    def scatter(self, values: Tensor, shape: torch.Size) -> Tensor:
        """``[Nv]`` values at their completion positions of a ``[B, Lc]`` tensor, 0 elsewhere
        (differentiable in ``values``)."""
        return values.new_zeros(shape).index_put(self.where, values)


def pack(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> PackedRows:
    """Pack ``[B, L]`` rows (prompt left padded to Lp, completion right padded to Lc) padding-free.

    A row's real tokens (``attention_mask``) keep their order; the completion token at column
    ``Lp + t`` is predicted by the hidden state of the real token before it, as in the padded pass."""
    real = attention_mask.bool()  # [B, L]
    lengths = real.sum(-1)  # [B]
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    starts = cu[:-1].long()  # [B]
    # packed index of every real column: the row's start plus its rank among the row's real tokens
    index = starts.unsqueeze(-1) + real.long().cumsum(-1) - 1  # [B, L] (valid where real)
    flat = input_ids[real].unsqueeze(0)  # [1, N] row-major: each row's real tokens in order
    positions = (torch.arange(flat.shape[1], device=input_ids.device)
                 - starts.repeat_interleave(lengths)).unsqueeze(0)  # [1, N]
    lc = completion_mask.shape[1]
    where = completion_mask.nonzero(as_tuple=True)  # ([Nv], [Nv])
    rows, cols = where
    keep = index[rows, input_ids.shape[1] - lc + cols] - 1  # [Nv] the token before each target
    if not bool(real[rows, input_ids.shape[1] - lc + cols].all()):
        raise ValueError("packing: a valid completion token (completion_mask) is padding in attention_mask")
    max_length = int(lengths.max()) if lengths.numel() else 0
    return PackedRows(flat, positions, cu, max_length, keep, input_ids[:, -lc:][where], where)


# ----- attention -----------------------------------------------------------------------------------
def packed_sdpa_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' SDPA, run per row of a packed call (``cu_seq_lens_q`` given): ``[1, heads, N, d]``
    inputs, ``[1, N, heads, d]`` output, no attention across rows and no mask tensor."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    if cu is None:  # not packed (also read in a checkpointed layer's recompute, where the kwargs travel)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    bounds = cu.tolist()
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
               for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outputs, dim=1), None


def _packed_sdpa_mask(*args, **kwargs):
    """No mask for a packed call (``packed_sdpa_forward`` splits the rows); transformers' SDPA mask
    for any other call."""
    from transformers.masking_utils import sdpa_mask

    return None if _packed_call.get() else sdpa_mask(*args, **kwargs)


_registered = False


def register_attention() -> None:
    """Register ``espo_packed_sdpa`` with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    _registered = True


@contextmanager
def packed_call():
    """Mark the forwards inside as packed calls (the mask function reads it)."""
    token = _packed_call.set(True)
    try:
        yield
    finally:
        _packed_call.reset(token)


def packing_blocker(model) -> str | None:
    """Why ``model`` cannot take packed input, or None when it can."""
    if hasattr(model, "get_base_model"):  # a peft wrapper: the transformers model inside
        model = model.get_base_model()
    # FSDP2 subclasses the model's class on the fly; the transformers class stays in its MRO
    if not any(c.__module__.startswith("transformers.models.") for c in type(model).__mro__):
        return (f"{type(model).__name__} is not a transformers model class ({type(model).__module__}): "
                "custom-code models build their own attention masks and may attend across packed rows")
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED:
        return f"its attention implementation {impl!r} has no packed-sequence support (use one of {', '.join(SUPPORTED[:1] + NATIVE)})"
    layer_types = getattr(config, "layer_types", None) or ()
    if impl in ("sdpa", PACKED_SDPA) and any(t != "full_attention" for t in layer_types):
        return f"its layers {sorted(set(layer_types))} include windowed attention, which the per-row SDPA does not implement"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    return None


def prepare_for_packing(model, name: str = "model") -> None:
    """Refuse (``ConfigError``, one line naming ``model.packing`` and the model) a model whose attention
    cannot take packed input; switch an SDPA model to the per-row packed SDPA."""
    from espo_lightning.errors import ConfigError

    reason = packing_blocker(model)
    if reason:
        path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise ConfigError(f"model.packing: the {name} {path!r} cannot take packed sequences: {reason}; "
                          "set model.packing: false")
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if model.config._attn_implementation == "sdpa":
        register_attention()
        model.config._attn_implementation = PACKED_SDPA
