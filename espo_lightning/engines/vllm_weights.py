"""What the weight sync sends to vLLM: the policy's full tensors, under the names of its checkpoint
on disk, in the engine's dtype.

Names. vLLM's ``load_weights`` expects checkpoint names (what ``save_pretrained`` writes), while
``state_dict()`` gives transformers' in-memory names. For most dense models they agree; transformers
5 fuses some parameters at load (Qwen3-MoE's experts become one ``mlp.experts.gate_up_proj`` tensor
``[E, 2I, H]`` in memory, ``experts.{e}.gate_proj`` / ``up_proj`` on disk). Each tensor goes through
transformers' own reverse conversion (``revert_weight_conversion``, which ``save_pretrained`` runs),
so the engine receives exactly the names and shapes of a saved checkpoint.

Bytes. A DTensor shard is cast to the engine's dtype *before* the all-gather (half the bytes of an
fp32 gather for a bf16 engine), and one gathered parameter at a time is handed over; vLLM's
layerwise reload buffers the tensors of one layer until that layer is complete, so at most about
one layer's worth of full tensors is alive at a time on each rank."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

# Prefixes that wrappers (torch.compile, activation checkpointing) add to parameter names.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _conversions(policy) -> bool:
    """Whether transformers renames or fuses any of this model's weights at load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4: in-memory names are checkpoint names
        return False
    if getattr(policy, "_weight_conversions", None):
        return True
    mapping = get_model_conversion_mapping(policy, add_legacy=False) or []
    return any(not isinstance(m, PrefixChange) for m in mapping)


def _sources(policy: torch.nn.Module, adapters: str):
    """``((name without wrapper prefixes, tensor) pairs, the model whose conversions apply, the
    reverse conversion or None)``. A PEFT (LoRA) policy gives its merged weights (``adapters:
    "merged"``) or its frozen base (``"base"``) under the base's names."""
    if hasattr(policy, "peft_config"):
        from espo_lightning.policy.lora import base_state, merged_state

        items = merged_state(policy) if adapters == "merged" else base_state(policy)
        policy = policy.get_base_model()
    else:
        items = policy.state_dict().items()
    revert = None
    if _conversions(policy):
        from transformers.core_model_loading import revert_weight_conversion

        revert = revert_weight_conversion

    def strip(name: str) -> str:
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        return name

    return ((strip(name), value) for name, value in items), policy, revert


def engine_weights(policy: torch.nn.Module, dtype: torch.dtype | None,
                   adapters: str = "merged") -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every state-dict entry, cast to ``dtype`` (None: as is).

    Under FSDP2 every rank must consume the whole iterator in the same order (``full_tensor`` is a
    collective). A tied head is sent too, under its own name: vLLM ties the parameter, but the CPU
    build packs a separate copy of the head's weight for its GEMM, refreshed only when the head
    itself is reloaded. A PEFT (LoRA) policy sends its merged weights, ``W + scaling * B @ A``
    computed out of place, under the base checkpoint's names (``espo_lightning.policy.lora``), or
    with ``adapters="base"`` its frozen base alone (for an engine that applies the adapters itself)."""
    from torch.distributed.tensor import DTensor

    items, policy, revert = _sources(policy, adapters)
    for name, value in items:
        value = value.detach()
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)  # on the shard: the gather moves engine-dtype bytes
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if revert is None:
            yield name, value
        else:
            yield from revert(policy, {name: value}).items()


def engine_weight_metadata(policy: torch.nn.Module,
                           dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(checkpoint name, dtype, full shape) of what ``engine_weights`` yields, in its order, without
    gathering anything (a DTensor's ``shape`` is the global one; a renaming or fused conversion is
    replayed on meta tensors): what a receiver needs before a broadcast starts (the NCCL path)."""
    items, policy, revert = _sources(policy, "base")  # merged weights have the base's names and shapes
    meta = []
    for name, value in items:
        out = dtype if dtype is not None and value.is_floating_point() else value.dtype
        shape = tuple(value.shape)  # a DTensor's is the full one
        if revert is None:
            meta.append((name, out, shape))
        else:
            for key, tensor in revert(policy, {name: torch.empty(shape, dtype=out, device="meta")}).items():
                meta.append((key, tensor.dtype, tuple(tensor.shape)))
    return meta


class LoadFailures(logging.Handler):
    """Collects vLLM's "<Layer>: Failed to load weights" warnings during one reload: that layer
    received none of the tensors sent and kept what it held before (random dummy weights on the
    first sync). Rotary embeddings say it on every reload (they have buffers, nothing to load)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.layers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Failed to load weights" in message and not is_rotary_notice(message):
            self.layers.append(message.split(":", 1)[0].strip())


def is_rotary_notice(message: str) -> bool:
    return message.split(":", 1)[0].strip().endswith(("RotaryEmbedding", "Rotary"))


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@contextmanager
def watch_load_failures():
    handler = LoadFailures()
    logger = logging.getLogger(RELOAD_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
