"""The comparison's entropy figure (issue 31 item 4) on synthetic curves: one line per method, a seed
band, and the caption in the report."""
from __future__ import annotations

import numpy as np

from espo_lightning.compare import figures
from espo_lightning.compare.curves import RunCurves, band


def _run(method: str, seed: int, entropy: list[float]) -> RunCurves:
    steps = np.arange(len(entropy)) * 4 + 3  # 4 optimizer steps per rollout, logged at the last one
    walls = np.arange(len(entropy), dtype=float)
    return RunCurves(method, seed, {"entropy/mean_epoch": (steps, np.array(entropy), walls),
                                    "reward/mean": (steps, np.zeros(len(entropy)), walls)}, steps_per_rollout=4)


def test_entropy_figure_draws_every_method_with_its_seed_band(tmp_path):
    groups = {"ESPO": [_run("ESPO", 0, [1.0, 0.9, 0.8]), _run("ESPO", 1, [1.2, 1.0, 0.6])],
              "Clip-Cov": [_run("Clip-Cov", 0, [1.0, 1.0, 1.0])]}
    b = band(groups["ESPO"], "entropy/mean")  # the per-rollout series read from its _epoch aggregate
    np.testing.assert_allclose(b.x, [1, 2, 3])
    np.testing.assert_allclose(b.mean, [1.1, 0.95, 0.7])
    np.testing.assert_allclose(b.low, [1.0, 0.9, 0.6])
    written = figures.render(tmp_path, groups, smoothing=0.0)
    assert written["entropy"] == tmp_path / "entropy.png"
    assert (tmp_path / "entropy.png").stat().st_size > 1000
    assert "entropy_and_clip" not in written  # no method logged entropy groups here


def test_entropy_figure_is_skipped_without_entropy():
    groups = {"GRPO": [RunCurves("GRPO", 0, {"reward/mean": (np.array([3]), np.array([0.1]), np.array([0.0]))}, 4)]}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        assert figures.entropy(Path(folder), groups, 0.0) is None


def test_the_report_captions_the_entropy_figure(tmp_path):
    from espo_lightning.compare import report
    from espo_lightning.compare.plan import ComparePlan

    groups = {"ESPO": [_run("ESPO", 0, [1.0, 0.9, 0.8])], "SAPO": [_run("SAPO", 0, [1.0, 1.0, 0.9])]}
    plan = ComparePlan(base=["conf/chain.yaml"], methods={"ESPO": [], "SAPO": ["conf/sapo.yaml"]}, seeds=[0])
    written = figures.render(tmp_path, groups, smoothing=0.0)
    text = report.write(tmp_path, plan, groups, written, "python -m espo_lightning.compare").read_text()
    assert "![entropy](entropy.png)" in text
    assert "Mean token entropy of the sampling policy per method" in text
