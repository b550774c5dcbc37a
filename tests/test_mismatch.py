"""Truncated importance-sampling weights for the engine/trainer mismatch (``data.tis_cap``: the
token-level ``truncate`` variant of ``espo_lightning.rollout.behaviour``)."""
from __future__ import annotations

import math

import pytest
import torch

from espo_lightning.errors import ConfigError
from espo_lightning.rollout.behaviour import BehaviourCorrection, behaviour_weights


def truncated_is_weights(old, engine, mask, cap: float = 2.0):
    """What ``data.tis_cap: cap`` applies: token level, truncated at ``cap``."""
    weights, masked = behaviour_weights(old, engine, mask, BehaviourCorrection("truncate", "token", high=cap))
    assert not masked.any()  # truncation never masks
    return weights


def test_weights_by_hand():
    """Row 0: old - engine = 0, ln 1.5, -ln 2  -> 1, 1.5, 0.5 (all under the cap 2).
    Row 1: old - engine = ln 3 -> 3, truncated to the cap 2; 50 -> exp would be 5e21, truncated to 2;
    the third token is padding -> 0 whatever its values."""
    engine = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -60.0, 0.0]])
    old = engine + torch.tensor([[0.0, math.log(1.5), -math.log(2.0)], [math.log(3.0), 50.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = truncated_is_weights(old, engine, mask, cap=2.0)
    expected = torch.tensor([[1.0, 1.5, 0.5], [2.0, 2.0, 0.0]])
    torch.testing.assert_close(w, expected)


def test_no_mismatch_gives_ones_and_no_grad():
    old = torch.randn(4, 5, requires_grad=True)
    mask = torch.rand(4, 5) > 0.3
    w = truncated_is_weights(old, old.detach().clone(), mask)
    assert not w.requires_grad
    torch.testing.assert_close(w, mask.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_inf(dtype):
    old = torch.tensor([[0.0, -1.0]], dtype=dtype)
    engine = torch.tensor([[-float("inf"), 0.0]], dtype=dtype)  # a token the engine called impossible
    w = truncated_is_weights(old, engine, torch.ones(1, 2, dtype=torch.bool), cap=3.0)
    assert w.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(w, torch.tensor([[3.0, math.exp(-1.0)]], dtype=w.dtype))


def test_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="high"):
        truncated_is_weights(x, x, x.bool(), cap=0.0)
    with pytest.raises(ValueError, match="shapes"):
        truncated_is_weights(x, torch.zeros(2, 4), x.bool())
