"""``model.attn_implementation: auto``: FlashAttention-2 (varlen, no padding mask) where a GPU and the
flash-attn package are both present, SDPA elsewhere; explicit values pass through unchanged."""
from __future__ import annotations

import importlib.util

import torch

from espo_lightning.policy import attention
from espo_lightning.training.module import PolicyModule


def test_auto_is_sdpa_without_a_gpu_or_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve_attn_implementation("auto") == "sdpa"
    assert PolicyModule("unused", attn_implementation="auto").attn_implementation == "sdpa"


def test_auto_is_flash_attention_2_on_a_gpu_with_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention.resolve_attn_implementation("auto") == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert attention.resolve_attn_implementation("auto") == "sdpa"  # a GPU without the package


def test_explicit_values_pass_through():
    for name in ("sdpa", "eager", "flash_attention_2", None):
        assert attention.resolve_attn_implementation(name) == name
