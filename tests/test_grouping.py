"""Entropy group assignment (DESIGN section 2, "Entropy groups"), checked by hand."""
import math

import pytest
import torch

from espo_lightning.losses.grouping import (
    assign_entropy_groups,
    entropy_ranks,
    num_high_tokens,
    quantile_groups,
    threshold_groups,
    top_fraction_groups,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def m(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_top_fraction_by_hand():
    """ent = [0.1, 0.5, 0.3, 0.9, 0.2], n = 5.
    rho = 0.2: ceil(1.0) = 1 high token, the 0.9 at position 3.
    rho = 0.4: ceil(2.0) = 2 high tokens, 0.9 (pos 3) and 0.5 (pos 1).
    Masking position 3 out: n = 4, rho = 0.4 -> ceil(1.6) = 2 -> 0.5 (pos 1) and 0.3 (pos 2); pos 3 -> -1."""
    ent = t([0.1, 0.5, 0.3, 0.9, 0.2])
    full = m([True] * 5)
    assert top_fraction_groups(ent, full, 0.2).tolist() == [[1, 1, 1, 0, 1]]
    assert top_fraction_groups(ent, full, 0.4).tolist() == [[1, 0, 1, 0, 1]]
    part = m([True, True, True, False, True])
    assert top_fraction_groups(ent, part, 0.4).tolist() == [[1, 0, 0, -1, 1]]


def test_top_fraction_tolerates_binary_rounding():
    """0.1 * 30 = 3.0000000000000004 in float64; a plain ceil would give 4 high tokens, we want 3."""
    assert num_high_tokens(torch.tensor([30, 0, 1, 7]), 0.1).tolist() == [3, 0, 1, 1]
    ent = torch.arange(30, dtype=torch.float32).unsqueeze(0)
    groups = top_fraction_groups(ent, torch.ones(1, 30, dtype=torch.bool), 0.1)
    assert groups[0, 27:].tolist() == [0, 0, 0] and (groups[0, :27] == 1).all()


def test_top_fraction_ties_break_by_position():
    """All five entropies equal, rho = 0.4 -> exactly ceil(2.0) = 2 high tokens: the first two.
    [0.2, 0.7, 0.7, 0.7, 0.1] -> the tied 0.7s at positions 1, 2 win over position 3."""
    full = m([True] * 5)
    assert top_fraction_groups(t([0.5] * 5), full, 0.4).tolist() == [[0, 0, 1, 1, 1]]
    assert top_fraction_groups(t([0.2, 0.7, 0.7, 0.7, 0.1]), full, 0.4).tolist() == [[1, 0, 0, 1, 1]]


def test_top_fraction_matches_sort_ranks_on_random_ties():
    """The topk shortcut equals "rank < ceil(rho * n)" from a full stable sort, ties included."""
    gen = torch.Generator().manual_seed(0)
    ent = torch.randint(0, 4, (64, 37), generator=gen).float()  # many ties
    mask = torch.rand(64, 37, generator=gen) < 0.7
    mask[3] = False
    for rho in (0.05, 0.2, 0.5, 1.0):
        ranks = entropy_ranks(ent, mask)
        k = num_high_tokens(mask.sum(-1), rho).unsqueeze(-1)
        expected = torch.where(mask, (ranks >= k).long(), -1)
        assert torch.equal(top_fraction_groups(ent, mask, rho), expected)


def test_length_one_and_empty_rows():
    ent = t([0.3, 0.0, 0.0], [1.0, 2.0, 3.0])
    mask = m([True, False, False], [False, False, False])
    assert top_fraction_groups(ent, mask, 0.2).tolist() == [[0, -1, -1], [-1, -1, -1]]
    assert quantile_groups(ent, mask, 3).tolist() == [[0, -1, -1], [-1, -1, -1]]


def test_quantile_bins_when_n_not_divisible_by_k():
    """Bin of rank r = min(K-1, floor(r*K/n)).
    n = 5, K = 2: r = 0..4 -> floor(0, .4, .8, 1.2, 1.6) = 0,0,0,1,1.
    n = 7, K = 3: floor(3r/7) for r = 0..6 -> 0,0,0,1,1,2,2 (sizes 3, 2, 2).
    n = 2, K = 4: r = 0 -> 0, r = 1 -> floor(4/2) = 2: bins 1 and 3 stay empty."""
    ent5 = t([0.5, 0.4, 0.3, 0.2, 0.1])  # already in rank order
    assert quantile_groups(ent5, m([True] * 5), 2).tolist() == [[0, 0, 0, 1, 1]]
    ent7 = t([0.1, 0.7, 0.3, 0.6, 0.2, 0.5, 0.4])  # ranks: 6, 0, 4, 1, 5, 2, 3
    assert quantile_groups(ent7, m([True] * 7), 3).tolist() == [[2, 0, 1, 0, 2, 0, 1]]
    assert quantile_groups(t([0.1, 0.9]), m([True, True]), 4).tolist() == [[2, 0]]


def test_threshold_bins_and_cut_point_equality():
    """Cuts [0.5, 1.0]; bin = number of cuts <= entropy, group = 2 - bin (0 = highest).
    ent [0.2, 0.5, 0.7, 1.0, 3.0] -> cuts reached [0, 1, 1, 2, 2] -> groups [2, 1, 1, 0, 0]:
    an entropy equal to a cut point counts as reaching it. The same holds for a cut (0.1) that is
    not exact in binary: the float32 entropy 0.1 reaches the cut 0.1."""
    ent = t([0.2, 0.5, 0.7, 1.0, 3.0])
    assert threshold_groups(ent, m([True] * 5), [0.5, 1.0]).tolist() == [[2, 1, 1, 0, 0]]
    assert threshold_groups(t([0.1, 0.09999]), m([True, True]), [0.1]).tolist() == [[0, 1]]
    assert threshold_groups(t([0.1, 0.2]), m([True, False]), [0.1]).tolist() == [[0, -1]]


def test_token_and_sequence_modes():
    mask = m([True, True, False], [False, True, True])
    assert assign_entropy_groups(None, mask, "token").tolist() == [[0, 1, -1], [-1, 1, 2]]
    assert assign_entropy_groups(None, mask, "sequence").tolist() == [[0, 0, -1], [-1, 0, 0]]


def test_batch_scope_ranks_over_all_valid_tokens():
    """Valid entropies: row 0 [0.1, 0.9, (pad 5.0)], row 1 [0.8, 0.2, 0.3]; N = 5, rho = 0.4 ->
    ceil(2.0) = 2 high tokens in the whole batch: 0.9 (row 0) and 0.8 (row 1); the padded 5.0 is
    ignored. Per-response scope would instead take one per row plus ceil(0.4*3) = 2 of row 1."""
    ent = t([0.1, 0.9, 5.0], [0.8, 0.2, 0.3])
    mask = m([True, True, False], [True, True, True])
    batch = assign_entropy_groups(ent, mask, "top_fraction", high_entropy_fraction=0.4, scope="batch")
    assert batch.tolist() == [[1, 0, -1], [0, 1, 1]]
    per_response = assign_entropy_groups(ent, mask, "top_fraction", high_entropy_fraction=0.4)
    assert per_response.tolist() == [[1, 0, -1], [0, 1, 0]]
    quant = assign_entropy_groups(ent, mask, "quantile", num_groups=2, scope="batch")
    # batch ranks: 0.9 -> 0, 0.8 -> 1, 0.3 -> 2, 0.2 -> 3, 0.1 -> 4; bins floor(2r/5) = 0,0,0,1,1
    assert quant.tolist() == [[1, 0, -1], [0, 1, 0]]


def test_invalid_mode_and_missing_entropies():
    mask = m([True])
    with pytest.raises(ValueError, match="grouping must be one of"):
        assign_entropy_groups(t([1.0]), mask, "median")
    with pytest.raises(ValueError, match="needs the old policy's entropies"):
        assign_entropy_groups(None, mask, "top_fraction")


def test_nan_entropy_on_padding_is_ignored():
    ent = t([0.3, math.nan, 0.9])
    mask = m([True, False, True])
    assert top_fraction_groups(ent, mask, 0.5).tolist() == [[1, -1, 0]]
    assert quantile_groups(ent, mask, 2).tolist() == [[1, -1, 0]]
