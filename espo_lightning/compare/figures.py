"""The comparison's figures: one PNG per question, curves over rollouts, a line per method (mean over
seeds, EMA-smoothed) and a shaded band from the lowest to the highest seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from espo_lightning.compare.curves import RunCurves, band
from espo_lightning.plots import smooth


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, groups: dict[str, list[RunCurves]], tag: str, title: str, ylabel: str, smoothing: float,
           scale: float = 1.0) -> bool:
    drawn = False
    for i, (method, runs) in enumerate(groups.items()):
        b = band(runs, tag)
        if b is None:
            continue
        w = 0.0 if tag.startswith("val/") else smoothing  # a few evaluations: drawn as measured
        ax.plot(b.x, smooth(b.mean, w) * scale, color=f"C{i}", label=f"{method} ({len(runs)} seeds)",
                marker="o" if w == 0.0 else None, markersize=3)
        if len(runs) > 1:
            ax.fill_between(b.x, smooth(b.low, w) * scale, smooth(b.high, w) * scale, color=f"C{i}", alpha=0.18, lw=0)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("rollouts")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return drawn


def _figure(path: Path, groups, panels: list[tuple], smoothing: float, width: float = 5.2) -> Path | None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False)
    drawn = [_panel(ax, groups, *panel, smoothing=smoothing) for ax, panel in zip(axes[0], panels)]
    if not any(drawn):
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy(out: Path, groups, smoothing: float) -> Path | None:
    return _figure(out / "accuracy.png", groups, [
        ("val/accuracy", "Validation accuracy (greedy)", "accuracy"),
        ("reward/mean", "Training reward (rollout mean)", "reward")], smoothing)


def clip_fractions(out: Path, groups, smoothing: float) -> Path | None:
    return _figure(out / "clip_fractions.png", groups, [
        ("clip/low", "Low clip fraction (ratio < 1 - eps, A < 0)", "fraction of tokens"),
        ("clip/high", "High clip fraction (ratio > 1 + eps, A > 0)", "fraction of tokens")], smoothing)


def entropy(out: Path, groups, smoothing: float) -> Path | None:
    """Every method's mean token entropy of the old policy over training, one line each: entropy
    collapse is what the entropy-aware methods (SAPO, Clip-Cov, KL-Cov, the entropy mask) exist to
    prevent."""
    return _figure(out / "entropy.png", groups, [
        ("entropy/mean", "Mean token entropy of the sampling policy", "nats")], smoothing, width=6.4)


def gradient_utilization(out: Path, groups, smoothing: float) -> Path | None:
    return _figure(out / "gradient_utilization.png", groups, [
        ("grad_util/token", "Tokens that carry gradient", "fraction of tokens"),
        ("grad_util/sequence", "Responses with any gradient", "fraction of responses")], smoothing)


def response_length(out: Path, groups, smoothing: float) -> Path | None:
    return _figure(out / "response_length.png", groups, [
        ("rollout/response_len_mean", "Mean response length", "tokens")], smoothing)


def step_time(out: Path, groups, smoothing: float) -> Path | None:
    return _figure(out / "step_time.png", groups, [
        ("perf/rollout_time_s", "Rollout (generate + score) per rollout", "seconds"),
        ("perf/update_time_s", "Policy update per rollout", "seconds")], smoothing)


def entropy_and_clip(out: Path, groups, smoothing: float) -> Path | None:
    """Per method with entropy groups: mean token entropy (left axis) and clip fraction (right axis)
    over training, so 'clip rises as entropy falls' reads off one panel."""
    grouped = {m: runs for m, runs in groups.items() if any(t.startswith("entropy_group/") for r in runs for t in r.tags)}
    if not grouped:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grouped), figsize=(5.6 * len(grouped), 3.8), squeeze=False)
    for ax, (method, runs) in zip(axes[0], grouped.items()):
        twin = ax.twinx()
        for axis, tag, color, label in ((ax, "entropy/mean", "C0", "mean token entropy (nats)"),
                                        (twin, "clip/total", "C3", "clip fraction")):
            b = band(runs, tag)
            if b is None:
                continue
            axis.plot(b.x, smooth(b.mean, smoothing), color=color)
            if len(runs) > 1:
                axis.fill_between(b.x, smooth(b.low, smoothing), smooth(b.high, smoothing), color=color, alpha=0.15, lw=0)
            axis.set_ylabel(label, color=color)
            axis.tick_params(axis="y", colors=color)
        ax.set_title(f"{method}: entropy and clip fraction ({len(runs)} seeds)")
        ax.set_xlabel("rollouts")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "entropy_vs_clip.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FIGURES = (accuracy, clip_fractions, entropy, entropy_and_clip, gradient_utilization, response_length, step_time)


def render(out: Path, groups: dict[str, list[RunCurves]], smoothing: float) -> dict[str, Path]:
    """Every figure some run has data for: ``{figure name: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for figure in FIGURES:
        path = figure(out, groups, smoothing)
        if path is not None:
            written[figure.__name__] = path
    return written


