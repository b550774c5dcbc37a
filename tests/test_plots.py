"""``espo_lightning.plots`` on small synthetic TensorBoard runs written with ``SummaryWriter``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from espo_lightning import plots

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, steps: int = 12, groups: int = 2, epoch_only: bool = False) -> Path:
    """A run laid out like Lightning's: ``folder/lightning_logs/version_0/events...``."""
    logdir = folder / "lightning_logs" / "version_0"
    suffix = "_epoch" if epoch_only else ""
    with SummaryWriter(str(logdir)) as w:
        for step in range(steps):
            w.add_scalar("clip/low" + suffix, 0.01 + 0.001 * step, step)
            w.add_scalar("clip/high" + suffix, 0.02 - 0.001 * step, step)
            w.add_scalar("clip/total" + suffix, 0.03, step)
            w.add_scalar("entropy/mean" + suffix, 1.0 - 0.05 * step, step)
            w.add_scalar("reward/mean" + suffix, 0.4 + 0.01 * step, step)
            if step % 4 == 0:
                w.add_scalar("val/accuracy", 0.5 + 0.02 * step, step)
            for k in range(groups):
                w.add_scalar(f"entropy_group/{k}/epsilon_mean" + suffix, 0.02 / (k + 1), step)
                w.add_scalar(f"entropy_group/{k}/clip_frac" + suffix, 0.1 / (k + 1), step)
    return folder


def test_load_scalars_finds_the_event_folder_below_the_run_dir(tmp_path):
    run = write_run(tmp_path / "espo", steps=5)
    scalars = plots.load_scalars(run)
    steps, values = scalars["clip/low"]
    assert steps.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(values, [0.01, 0.011, 0.012, 0.013, 0.014], rtol=1e-6)
    assert plots.entropy_groups(scalars) == [0, 1]


def test_render_overlays_runs_and_writes_pngs(tmp_path):
    espo = write_run(tmp_path / "espo", groups=2)
    grpo = write_run(tmp_path / "grpo", groups=0, epoch_only=True)  # no groups; only epoch aggregates
    written = plots.render([str(espo), str(grpo)], tmp_path / "figs", labels=["ESPO", "GRPO"], smoothing=0.5)
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "clip_fractions.png", "entropy_groups.png", "entropy_vs_clip.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_runs_without_entropy_groups_skip_that_figure(tmp_path, capsys):
    run = write_run(tmp_path / "gspo", groups=0)
    written = plots.render([str(run)], tmp_path / "figs")
    assert sorted(p.name for p in written) == ["accuracy.png", "clip_fractions.png", "entropy_vs_clip.png"]
    assert "plot_entropy_groups" in capsys.readouterr().err


def test_smoothing_matches_tensorboard_ema():
    values = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(plots.smooth(values, 0.0), values)
    # debiased EMA with weight 0.5: 1, (0.25 / 0.75), (0.125 / 0.875)
    np.testing.assert_allclose(plots.smooth(values, 0.5), [1.0, 1 / 3, 1 / 7])


def test_clear_errors_for_a_folder_without_events_and_bad_labels(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        plots.main([str(empty), "--out", str(tmp_path / "figs")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no TensorBoard event files" in err and str(empty) in err
    run = write_run(tmp_path / "espo", steps=3)
    with pytest.raises(SystemExit):
        plots.main([str(run), "--out", str(tmp_path / "figs"), "--labels", "a", "b"])
    assert "2 labels for 1 run" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    run = write_run(tmp_path / "espo", steps=4)
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "espo_lightning.plots", str(run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "clip_fractions.png").exists() and "clip_fractions.png" in proc.stdout


def test_accuracy_figure_needs_accuracy_or_reward(tmp_path, capsys):
    logdir = tmp_path / "bare" / "lightning_logs" / "version_0"
    with SummaryWriter(str(logdir)) as w:
        w.add_scalar("clip/low", 0.1, 0)
    written = plots.render([str(tmp_path / "bare")], tmp_path / "figs")
    assert [p.name for p in written] == ["clip_fractions.png"]
    assert "plot_accuracy: no run has the scalars it needs" in capsys.readouterr().err
