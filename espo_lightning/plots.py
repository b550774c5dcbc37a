"""Paper-style figures from the TensorBoard scalars of one or more runs.

    python -m espo_lightning.plots RUN_DIR [RUN_DIR ...] --out DIR [--labels ESPO GSPO GRPO] [--smooth 0.6]

A RUN_DIR is any folder holding TensorBoard event files, directly or below it (e.g.
``runs/quickstart`` with ``lightning_logs/version_0/events.out.tfevents.*`` inside); when several
folders below it hold event files, the most recently written one is used. Several runs are overlaid
in each figure (ESPO vs GSPO vs GRPO). Figures, written as PNG into ``--out``:

- ``clip_fractions.png``: ``clip/low`` and ``clip/high`` over optimizer steps.
- ``entropy_vs_clip.png``: per run, ``entropy/mean`` (left axis) and ``clip/total`` (right axis) over steps,
  per-rollout aggregates (``_epoch``) where logged.
- ``entropy_groups.png``: per entropy group k, ``entropy_group/<k>/epsilon_mean`` and ``/clip_frac``
  over steps (runs without entropy groups, e.g. GRPO, are left out of this one).
- ``accuracy.png``: greedy ``val/accuracy`` (never smoothed: it is measured every few rollouts) and
  the sampled ``reward/mean`` over steps.

Per-step tags are used where present, else the ``<tag>_epoch`` aggregates. A figure none of the runs
has data for is skipped with a note. Rendering uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

EVENT_PREFIX = "events.out.tfevents"

Series = tuple[np.ndarray, np.ndarray]  # (steps, values)


class NoEventsError(FileNotFoundError):
    pass


def find_event_dir(run_dir: str | os.PathLike) -> Path:
    """The folder under ``run_dir`` (itself included) whose event files were written last."""
    root = Path(run_dir)
    if not root.is_dir():
        raise NoEventsError(f"{root}: not a directory")
    folders: dict[Path, float] = {}
    for path in root.rglob(f"{EVENT_PREFIX}*"):
        if path.is_file():
            folders[path.parent] = max(folders.get(path.parent, 0.0), path.stat().st_mtime)
    if not folders:
        raise NoEventsError(f"{root}: no TensorBoard event files ({EVENT_PREFIX}.*) in this folder or below it; "
                            "pass the run's default_root_dir or its lightning_logs/version_N folder")
    return max(folders, key=folders.get)


def load_scalars(run_dir: str | os.PathLike) -> dict[str, Series]:
    """Every scalar tag of a run: ``{tag: (steps, values)}`` sorted by step; for a step logged twice
    (a resumed run) the last value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = find_event_dir(run_dir)
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def pick(scalars: dict[str, Series], tag: str) -> Series | None:
    """The per-step series of ``tag``, else its ``_epoch`` aggregate, else None."""
    for name in (tag, tag + "_epoch"):
        if name in scalars and len(scalars[name][0]):
            return scalars[name]
    return None


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's exponential moving average (debiased); ``weight`` 0 leaves values unchanged."""
    if weight <= 0 or len(values) == 0:
        return values
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out[i] = last / norm
    return out


def entropy_groups(scalars: dict[str, Series]) -> list[int]:
    ks = set()
    for tag in scalars:
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == "entropy_group" and parts[1].isdigit():
            ks.add(int(parts[1]))
    return sorted(ks)


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _two_panels(runs, path: Path, panels, plt) -> Path | None:
    """Two panels side by side, each one tag over steps with a line per run (``panels``: per panel
    ``(tag, smoothing, title, ylabel)``; smoothing 0 draws the values as measured, with markers);
    None when no run logged either tag."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for i, (label, scalars) in enumerate(runs):
        for ax, (tag, weight, _, _) in zip(axes, panels):
            series = pick(scalars, tag)
            if series is not None:
                ax.plot(series[0], smooth(series[1], weight), color=f"C{i}", label=label,
                        marker="o" if weight == 0.0 else None, markersize=3)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, (_, _, title, ylabel) in zip(axes, panels):
        _style(ax, title, "step", ylabel)
    axes[1].legend()
    return _save(fig, path, plt)


def plot_clip_fractions(runs, out: Path, smoothing: float, plt) -> Path | None:
    return _two_panels(runs, out / "clip_fractions.png", (
        ("clip/low", smoothing, "Low clip fraction (ratio < 1 - eps, A < 0)", "fraction of tokens"),
        ("clip/high", smoothing, "High clip fraction (ratio > 1 + eps, A > 0)", "fraction of tokens")), plt)


def plot_entropy_vs_clip(runs, out: Path, smoothing: float, plt) -> Path | None:
    """One panel per run: mean token entropy (left axis) and clip fraction (right axis) over steps,
    so "clip rises as entropy falls" reads off each panel (the paper's Fig. 5) without the zigzag of
    joining per-step (entropy, clip) points of overlapping runs."""
    # Per-rollout aggregates where logged: per step, the first minibatch of every rollout is on-policy
    # (nothing clipped), which turns the clip curve into a sawtooth.
    def per_rollout(scalars, tag):
        return scalars[tag + "_epoch"] if len(scalars.get(tag + "_epoch", ((),))[0]) else pick(scalars, tag)

    drawable = [(label, s) for label, s in runs if per_rollout(s, "entropy/mean") is not None]
    if not drawable:
        return None
    fig, axes = plt.subplots(1, len(drawable), figsize=(5.4 * len(drawable), 3.8), squeeze=False)
    for ax, (label, scalars) in zip(axes[0], drawable):
        twin = ax.twinx()
        for axis, tag, color, name in ((ax, "entropy/mean", "C0", "mean token entropy (nats)"),
                                       (twin, "clip/total", "C3", "clip fraction")):
            series = per_rollout(scalars, tag)
            if series is not None:
                axis.plot(series[0], smooth(series[1], smoothing), color=color)
                axis.set_ylabel(name, color=color)
                axis.tick_params(axis="y", colors=color)
        _style(ax, f"{label}: entropy and clip fraction", "step", "mean token entropy (nats)")
        ax.yaxis.label.set_color("C0")
    return _save(fig, out / "entropy_vs_clip.png", plt)


def plot_entropy_groups(runs, out: Path, smoothing: float, plt) -> Path | None:
    grouped = [(i, label, s, entropy_groups(s)) for i, (label, s) in enumerate(runs)]
    grouped = [g for g in grouped if g[3]]
    if not grouped:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, label, scalars, ks in grouped:
        for k in ks:
            for ax, field in zip(axes, ("epsilon_mean", "clip_frac")):
                series = pick(scalars, f"entropy_group/{k}/{field}")
                if series is not None:
                    name = f"{label} k={k}" + (" (highest entropy)" if k == 0 else "")
                    ax.plot(series[0], smooth(series[1], smoothing), styles[k % len(styles)], color=f"C{i}", label=name)
    _style(axes[0], "Clip range eps per entropy group", "step", "mean eps")
    _style(axes[1], "Clip fraction per entropy group", "step", "fraction of the group's tokens")
    axes[1].legend(fontsize="small")
    return _save(fig, out / "entropy_groups.png", plt)


def plot_accuracy(runs, out: Path, smoothing: float, plt) -> Path | None:
    return _two_panels(runs, out / "accuracy.png", (
        ("val/accuracy", 0.0, "Greedy val/accuracy", "accuracy"),
        ("reward/mean", smoothing, "Sampled reward (rollout mean)", "reward")), plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PLOTS = (plot_accuracy, plot_clip_fractions, plot_entropy_vs_clip, plot_entropy_groups)


def render(run_dirs: list[str], out: str | os.PathLike, labels: list[str] | None = None,
           smoothing: float = 0.0) -> list[Path]:
    """Write the figures for ``run_dirs`` into ``out``; returns the files written."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"--labels: got {len(labels)} labels for {len(run_dirs)} run folders")
    if not 0 <= smoothing < 1:
        raise ValueError(f"--smooth must be in [0, 1), got {smoothing}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).resolve().name for d in run_dirs]
    runs = [(label, load_scalars(d)) for label, d in zip(labels, run_dirs)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in PLOTS:
        path = plot(runs, out, smoothing, plt)
        if path is None:
            print(f"note: {plot.__name__}: no run has the scalars it needs; skipped", file=sys.stderr)
        else:
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m espo_lightning.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding TensorBoard event files")
    parser.add_argument("--out", required=True, help="folder the PNG figures are written to")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1), as in TensorBoard")
    args = parser.parse_args(argv)
    try:
        written = render(args.runs, args.out, args.labels, args.smooth)
    except (NoEventsError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
