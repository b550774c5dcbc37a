"""Off-policy correction by the behaviour (engine) policy (espo_lightning.rollout.behaviour,
``data.behaviour_correction``): each variant's weights by hand, ``data.tis_cap``'s equivalence, the
numerics at the edges, the validation, the ``rollout/behaviour_ratio/*`` statistics, and a fit
through the CLI that logs them to TensorBoard.

The log-ratios ``old - engine`` below are logs of powers of two (0.25, 0.5, 1, 2, 4, 8), so every
weight is one of those numbers, and no ratio lies on a bound (where float rounding decides)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from espo_lightning.errors import ConfigError
from espo_lightning.rollout.behaviour import (LOG_RATIO_BOUND, BehaviourCorrection, apply_behaviour_correction,
                                              behaviour_weights)
from espo_lightning.rollout.tensors import build_rollout_batch

REPO = Path(__file__).resolve().parents[1]


def _inputs(ratios: list[list[float | None]]):
    """``old``, ``engine``, ``mask`` whose valid tokens have the ratios given (None: padding)."""
    mask = torch.tensor([[r is not None for r in row] for row in ratios])
    log_r = torch.tensor([[math.log(r) if r is not None else 3.0 for r in row] for row in ratios])
    engine = torch.full(mask.shape, -2.0)
    return engine + log_r, engine, mask


def _weights(ratios, **kw):
    return behaviour_weights(*_inputs(ratios), BehaviourCorrection(**kw))


def test_token_truncate_by_hand():
    """Ratios 0.25, 1, 4 -> min(w, 2) = 0.25, 1, 2; padding 0; truncation masks nothing."""
    w, masked = _weights([[0.25, 1.0, 4.0], [8.0, None, None]], mode="truncate", level="token")
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 2.0], [2.0, 0.0, 0.0]]))
    assert not masked.any()
    w, _ = _weights([[0.25, 1.0, 4.0]], high=8.0)  # the cap is high: 4 passes under 8
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 4.0]]))


def test_token_mask_by_hand():
    """Bounds [0.5, 2] (the defaults): 0.25 and 4 are outside -> 0 and masked; 1 and 1.5 keep their
    ratio as the weight (MIS keeps w, it does not set 1)."""
    w, masked = _weights([[0.25, 1.0, 4.0, 1.5]], mode="mask")
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0, 1.5]]))
    assert masked.tolist() == [[True, False, True, False]]
    w, masked = _weights([[0.25, 1.0, 4.0, 1.5]], mode="mask", low=0.125, high=8.0)  # wider: nothing masked
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 4.0, 1.5]]))
    assert not masked.any()


def test_sequence_truncate_by_hand():
    """Product of a response's ratios: row 0: 2 * 4 = 8 -> min(8, 2) = 2 on both tokens; row 1:
    0.5 * 0.25 = 0.125; row 2: 0.5 alone (the padding does not enter) -> 0.5, and 0 on the padding."""
    w, masked = _weights([[2.0, 4.0], [0.5, 0.25], [0.5, None]], mode="truncate", level="sequence")
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0], [0.125, 0.125], [0.5, 0.0]]))
    assert not masked.any()


def test_sequence_mask_by_hand():
    """Bounds [0.5, 2]: row 0: 4 * 0.25 * 1 = 1 -> kept, weight 1 on each token (though 4 and 0.25
    alone would be masked); row 1: 4 * 1 = 4 -> the whole response masked (2 tokens, not the
    padding); row 2: 1.5 -> kept at 1.5."""
    w, masked = _weights([[4.0, 0.25, 1.0], [4.0, 1.0, None], [1.5, None, None]], mode="mask", level="sequence")
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    assert masked.tolist() == [[False] * 3, [True, True, False], [False] * 3]


def test_geometric_by_hand():
    """Geometric mean over the valid tokens: row 0: sqrt(2 * 8) = 4; row 1: (0.25 * 0.25)^(1/2) =
    0.25 (padding left out). Truncate at 2: 2 and 0.25. Mask [0.5, 5]: 4 kept, 0.25 masked."""
    ratios = [[2.0, 8.0, None], [0.25, 0.25, None]]
    w, _ = _weights(ratios, mode="truncate", level="geometric")
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 0.0], [0.25, 0.25, 0.0]]))
    w, masked = _weights(ratios, mode="mask", level="geometric", high=5.0)
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    assert int(masked.sum()) == 2


def test_icepop_by_hand():
    """IcePop's bounds [0.5, 5] by default: 0.25 and 8 masked, 1 and 4 kept with their ratio (the
    token mask with the default [0.5, 2] would also mask 4)."""
    w, masked = _weights([[0.25, 1.0, 4.0, 8.0]], mode="icepop")
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 4.0, 0.0]]))
    assert masked.tolist() == [[True, False, False, True]]
    w, _ = _weights([[0.25, 1.0, 4.0, 8.0]], mode="icepop", low=0.125, high=16.0)
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 4.0, 8.0]]))


def test_tis_cap_is_token_truncate():
    """token/truncate (what data.tis_cap applies) is ``min(exp(old - engine), cap)`` on valid tokens, 0
    elsewhere, on random inputs."""
    g = torch.Generator().manual_seed(0)
    engine = -torch.rand(6, 9, generator=g) * 4
    old = engine + torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.2
    for cap in (1.5, 2.0, 3.0):
        w, masked = behaviour_weights(old, engine, mask, BehaviourCorrection("truncate", "token", high=cap))
        by_hand = torch.where(mask, (old - engine).clamp(max=math.log(cap)).exp(), torch.zeros_like(old))
        torch.testing.assert_close(w, by_hand)
        assert not masked.any()


def test_edges_stay_finite():
    """Differences of 1000 nats both ways, an engine log-prob of -inf, a NaN; a sequence of 100 tokens
    of ratio 4 (product 4^100 = 1.6e60, past float32); a response whose tokens are all masked and one
    with no valid token. Every weight is finite; the extreme ones truncate to the cap or mask."""
    old = torch.tensor([[1000.0, -1000.0, 0.0, float("nan")]])
    engine = torch.tensor([[0.0, 0.0, -float("inf"), 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    for mode in ("truncate", "mask", "icepop"):
        w, masked = behaviour_weights(old, engine, mask, BehaviourCorrection(mode))
        assert torch.isfinite(w).all(), mode
    w, _ = behaviour_weights(old, engine, mask, BehaviourCorrection("truncate"))
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-LOG_RATIO_BOUND), 2.0, 2.0]]))
    _, masked = behaviour_weights(old, engine, mask, BehaviourCorrection("mask"))
    assert masked.all()

    long = torch.full((2, 100), math.log(4.0))
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1] = False  # a response with no valid token: weight 0, no 0/0
    for level, expect in (("sequence", 2.0), ("geometric", 2.0)):
        w, _ = behaviour_weights(long, torch.zeros_like(long), mask, BehaviourCorrection(level=level))
        assert torch.isfinite(w).all() and (w[0] == expect).all() and (w[1] == 0).all()
    w, masked = behaviour_weights(long, torch.zeros_like(long), mask, BehaviourCorrection("mask", "sequence"))
    assert (w == 0).all() and masked[0].all() and not masked[1].any()


def test_weights_carry_no_gradient_and_fold_into_advantages():
    """Advantages 0.5 and -1 of two responses with ratios [4, 1] and [0.25, 1.5], token mask [0.5, 2]:
    weights [0, 1] and [0, 1.5] -> advantages [[0, 0.5], [0, -1.5]]; the summary holds the raw
    ratios of the valid tokens and the 2 masked ones."""
    old, engine, mask = _inputs([[4.0, 1.0], [0.25, 1.5]])
    old.requires_grad_(True)
    w, _ = behaviour_weights(old, engine, mask, BehaviourCorrection("mask"))
    assert not w.requires_grad and w.dtype == torch.float32
    b = build_rollout_batch(prompt_ids=[[5], [5]], completion_ids=[[1, 2], [3, 4]], pad_id=0,
                            advantages=torch.tensor([0.5, -1.0]), rewards=torch.zeros(2),
                            engine_logprobs=engine.tolist(), temperature=1.0)
    b.old_logprobs = old
    summary = apply_behaviour_correction(b, BehaviourCorrection("mask"))
    torch.testing.assert_close(b.advantages, torch.tensor([[0.0, 0.5], [-0.0, -1.5]]))
    assert not b.advantages.requires_grad
    torch.testing.assert_close(summary.ratios, torch.tensor([4.0, 1.0, 0.25, 1.5]))
    assert summary.masked == 2
    torch.testing.assert_close(summary.weights, torch.tensor([0.0, 1.0, 0.0, 1.5]))
    b.advantages = torch.tensor([0.5, -1.0])
    summary = apply_behaviour_correction(b, None)  # off: the statistics only, advantages untouched
    assert summary.masked == 0 and summary.weights is None and b.advantages.shape == (2,)


def test_rollout_monitor_summarizes_the_ratios():
    """Two ranks' ratios [0.25, 1, 4, 1.5] (2 masked) and [0.5, 2] (0 masked): mean 9.25 / 6, min 0.25,
    max 4, masked_frac 2 / 6, from the sums and maxima the monitor all-reduces."""
    from callbacks.rollout import MAX_KEYS, SUM_KEYS, RolloutMonitor
    from espo_lightning.rollout.stats import RolloutStats

    def stats(ratios, masked):
        return RolloutStats(epoch=0, rewards=torch.ones(2), correct=torch.ones(2), response_lengths=torch.ones(2),
                            truncated=torch.zeros(2), zero_std_groups=0, num_groups=1, dropped_groups=0,
                            generation_time_s=1.0, scoring_time_s=0.0, rollout_time_s=1.0, generated_tokens=2,
                            behaviour_ratio=torch.tensor(ratios), behaviour_masked=masked)

    monitor = RolloutMonitor()
    ranks = [monitor.rank_totals(stats([0.25, 1.0, 4.0, 1.5], 2)), monitor.rank_totals(stats([0.5, 2.0], 0))]
    sums = {k: sum(r[0][k] for r in ranks) for k in SUM_KEYS}
    maxes = {k: max(r[1][k] for r in ranks) for k in MAX_KEYS}
    out = RolloutMonitor.summarize(sums, maxes)
    assert out["rollout/behaviour_ratio/mean"] == pytest.approx(9.25 / 6)
    assert out["rollout/behaviour_ratio/min"] == 0.25 and out["rollout/behaviour_ratio/max"] == 4.0
    assert out["rollout/behaviour_ratio/masked_frac"] == pytest.approx(2 / 6)
    none = RolloutMonitor.summarize(*monitor.rank_totals(stats([], 0)))  # no engine log-probs: not logged
    assert not any(k.startswith("rollout/behaviour_ratio") for k in none)


@pytest.mark.parametrize("kwargs, key", [
    (dict(mode="truncate", low=0.5), "data.behaviour_correction.low"),
    (dict(mode="mask", high=0.0), "data.behaviour_correction.high"),
    (dict(mode="mask", high=float("inf")), "data.behaviour_correction.high"),
    (dict(mode="mask", low=3.0, high=2.0), "data.behaviour_correction.low"),
    (dict(mode="icepop", level="sequence"), "data.behaviour_correction.level"),
    (dict(mode="drop"), "data.behaviour_correction.mode"),
    (dict(level="response"), "data.behaviour_correction.level"),
])
def test_invalid_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        BehaviourCorrection(**kwargs)
    assert "\n" not in str(err.value)


def test_datamodule_validation():
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.tasks.addition import AdditionSource

    def dm(**kw):
        return RolloutDataModule(train_data=AdditionSource(num_problems=8), reward_funcs=["espo_lightning.rewards.exact_match"], **kw)

    with pytest.raises(ConfigError, match=r"data\.tis_cap and data\.behaviour_correction"):
        dm(tis_cap=2.0, behaviour_correction=BehaviourCorrection())
    assert dm(tis_cap=3.0)._correction == BehaviourCorrection("truncate", "token", high=3.0)
    assert dm()._correction is None


def test_needs_engine_logprobs(tiny_model_dir):
    from test_rollout import _setup

    _, dm = _setup(tiny_model_dir, prompts_per_rollout=2, num_generations=2,
                   behaviour_correction=BehaviourCorrection("icepop"))
    batch, stats = dm.rollout(epoch=0)  # engine = trainer: every ratio ~1, nothing masked
    assert batch.advantages.shape == batch.completion_mask.shape
    torch.testing.assert_close(stats.behaviour_ratio, torch.ones_like(stats.behaviour_ratio), atol=1e-4, rtol=0)
    assert stats.behaviour_masked == 0 and stats.is_weights is None
    dm.engine.return_logprobs = False
    with pytest.raises(ConfigError, match=r"data\.behaviour_correction needs .*return_logprobs: true"):
        dm.rollout(epoch=1)


def test_fit_logs_behaviour_ratio_scalars(tmp_path, tiny_model_dir):
    """A one-rollout fit through the CLI with ``data.behaviour_correction`` in YAML: the four
    ``rollout/behaviour_ratio/*`` scalars reach TensorBoard (HF engine = trainer: ratios ~1)."""
    from espo_lightning.cli import main
    from espo_lightning.plots import load_scalars

    config = tmp_path / "behaviour.yaml"
    config.write_text("data:\n  engine:\n    class_path: espo_lightning.engines.HFEngine\n    init_args:\n"
                      "      return_logprobs: true\n  behaviour_correction:\n    mode: mask\n    level: geometric\n"
                      "    low: 0.8\n")
    main(["fit", "--config", str(REPO / "conf" / "quickstart.yaml"), "--config", str(config),
          "--model.model_name_or_path", tiny_model_dir, "--model.model_builder", "null", "--model.export_dir", "null",
          "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
          "--data.prompts_per_rollout", "2", "--data.num_generations", "4", "--data.minibatch_size", "8",
          "--data.val_data", "null"])
    scalars = load_scalars(tmp_path / "run")
    for name in ("mean", "min", "max", "masked_frac"):
        assert f"rollout/behaviour_ratio/{name}" in scalars, sorted(scalars)
    (_, mean), (_, masked) = scalars["rollout/behaviour_ratio/mean"], scalars["rollout/behaviour_ratio/masked_frac"]
    assert mean.tolist() == pytest.approx([1.0], abs=1e-3) and masked.tolist() == [0.0]


def test_a_bad_mode_in_the_cli_is_one_line_naming_the_key():
    """jsonargparse's nested message for ``--data.behaviour_correction.mode drop`` comes out as one line
    with the key, the allowed values and the value given."""
    from jsonargparse import ArgumentParser

    from espo_lightning.run.cli_errors import one_line

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data.behaviour_correction", type=BehaviourCorrection | None, default=None)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--data.behaviour_correction.mode", "drop"])
    line = one_line(str(err.value))
    assert line.startswith("data.behaviour_correction:") and "\n" not in line
    assert "'truncate', 'mask', 'icepop'" in line and "Got value: drop" in line
