"""Which attention kernel the policy runs: ``model.attn_implementation: auto`` picks FlashAttention-2
on a GPU where the ``flash_attn`` package is installed, SDPA elsewhere.

Why it matters at the paper's setting: micro-batches are left-padded prompts plus right-padded
completions up to 17,408 tokens. Under SDPA a padding mask is a ``[B, 1, T, T]`` tensor (1.2 GB per
row as float at 17k tokens), and any explicit mask rules out PyTorch's flash kernel, leaving the
memory-efficient or math kernel, in the forward, the checkpointed recompute and the backward.
transformers' ``flash_attention_2`` unpads the batch with the attention mask and runs the varlen
kernel: no ``[T, T]`` mask and no compute on padding."""
from __future__ import annotations

import importlib.util

import torch

FLASH = "flash_attention_2"


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(name: str | None) -> str | None:
    """``auto``: ``flash_attention_2`` where it can run, else ``sdpa``; any other value as given
    (None: the model's default)."""
    if name != "auto":
        return name
    return FLASH if flash_attention_available() else "sdpa"
