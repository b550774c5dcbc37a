"""Group-normalised advantages (DESIGN eq. 11), by hand."""
import math

import pytest
import torch

from espo_lightning.rollout.advantages import group_advantages, rewards_to_tensor

NONE = math.nan


def adv(values, group_size, **kwargs):
    return group_advantages(torch.tensor(values, dtype=torch.float64), group_size, **kwargs).tolist()


def test_two_outcomes_unbiased_and_biased_std():
    """[1, 0, 1, 0]: mean 0.5, deviations +-0.5.
    Unbiased: var = 4 * 0.25 / 3 = 1/3, std = 0.57735 -> A = +-0.5 / (0.57735 + 1e-6).
    Biased:   var = 4 * 0.25 / 4 = 1/4, std = 0.5     -> A = +-0.5 / (0.5 + 1e-6)."""
    s = math.sqrt(1 / 3)
    assert adv([1, 0, 1, 0], 4) == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)] * 2, rel=1e-12)
    assert adv([1, 0, 1, 0], 4, unbiased_std=False) == pytest.approx([0.5 / 0.500001, -0.5 / 0.500001] * 2, rel=1e-12)


def test_unscored_responses_are_left_out_and_get_zero():
    """[1, None, 0, 0]: S = {1, 0, 0}, mean 1/3, deviations [2/3, -1/3, -1/3];
    unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3 -> std = 0.57735.
    A = [(2/3)/std, 0, (-1/3)/std, (-1/3)/std] (eps = 0 here, to compare exactly)."""
    s = math.sqrt(1 / 3)
    assert adv([1, NONE, 0, 0], 4, eps=0.0) == pytest.approx([2 / 3 / s, 0.0, -1 / 3 / s, -1 / 3 / s], rel=1e-12)


def test_degenerate_groups_are_zero_and_never_nan():
    """All equal, a single scored response, or nothing scored: no signal, A = 0 (not NaN).
    Groups are independent: group 2 ([2, 4]) is normalised on its own: mean 3, std sqrt(2)."""
    out = adv([1, 1, 1, NONE, NONE, 5, NONE, NONE, NONE, 2, 4, NONE], 3)
    s = math.sqrt(2)
    assert out[:9] == [0.0] * 9
    assert out[9:] == pytest.approx([-1 / (s + 1e-6), 1 / (s + 1e-6), 0.0], rel=1e-12)
    assert adv([0.3], 1) == [0.0]
    big = group_advantages(torch.tensor([1e30, 1e30, 1e30, 1e30 * (1 + 1e-7)]), 2)
    assert torch.isfinite(big).all()


def test_float32_and_integer_rewards():
    out = group_advantages(torch.tensor([1, 0, 0, 0]), 4)
    assert out.dtype == torch.float32 and out[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-6)


def test_rewards_to_tensor():
    out = rewards_to_tensor([1, None, 0.5])
    assert out.dtype == torch.float32 and out[0] == 1 and math.isnan(out[1]) and out[2] == 0.5
    assert group_advantages(rewards_to_tensor([None, 1.0, None, 0.0]), 2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_validation():
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="must be a multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="eps must be"):
        group_advantages(torch.zeros(2), 2, eps=-1.0)
