"""``report.md``: the header (command, commit, date, machine), a table per method, the paper's three
claims each marked held or not held with its numbers, and the figures."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from espo_lightning.compare.curves import RunCurves, spearman, time_to_target
from espo_lightning.compare.plan import ComparePlan


def _stats(values) -> tuple[float, float, int]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(arr):
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def fmt(values, digits: int = 3) -> str:
    mean, std, n = _stats(values)
    return "n/a" if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def training_mean(run: RunCurves, tag: str) -> float | None:
    """A per-rollout tag averaged over training (None when the run did not log it)."""
    curve = run.series(tag)
    return None if curve is None else float(np.mean(curve.y))


def final_accuracy(run: RunCurves) -> float | None:
    curve = run.series("val/accuracy")
    return None if curve is None else float(curve.y[-1])


def seconds_per_step(run: RunCurves) -> float | None:
    rollout, update = run.series("perf/rollout_time_s"), run.series("perf/update_time_s")
    if rollout is None or update is None:
        return None
    # the median rollout: the first one carries one-off start-up costs
    return float(np.median(rollout.y + update.y) / run.steps_per_rollout)


def table(groups: dict[str, list[RunCurves]], target: float) -> str:
    rows = ["| method | seeds | final val/accuracy | best val/accuracy | reached "
            f"{target:.2f} | time to {target:.2f} (s) | rollouts to {target:.2f} | clip low | clip high | "
            "tokens with gradient | response length | s / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, runs in groups.items():
        hits = [time_to_target(r, target) for r in runs]
        best = [None if r.series("val/accuracy") is None else float(r.series("val/accuracy").y.max()) for r in runs]
        rows.append("| " + " | ".join([
            method, ", ".join(str(r.seed) for r in runs), fmt([final_accuracy(r) for r in runs]), fmt(best),
            f"{sum(h[0] is not None for h in hits)}/{len(runs)}",
            fmt([h[0] for h in hits], 0), fmt([h[1] for h in hits], 1),
            fmt([training_mean(r, "clip/low") for r in runs]), fmt([training_mean(r, "clip/high") for r in runs]),
            fmt([training_mean(r, "grad_util/token") for r in runs]),
            fmt([training_mean(r, "rollout/response_len_mean") for r in runs], 1),
            fmt([seconds_per_step(r) for r in runs], 2)]) + " |")
    return "\n".join(rows)


def _verdict(held: bool) -> str:
    return "**held**" if held else "**not held**"


def claim_underutilization(groups, plan: ComparePlan) -> str:
    espo, gspo = groups.get(plan.espo_method), groups.get(plan.gspo_method)
    head = "1. *GSPO's sequence clipping throws away valid tokens: its clip fractions are the highest, ESPO's low (Fig. 4).* "
    if not espo or not gspo:
        return head + f"Not tested: needs methods '{plan.espo_method}' and '{plan.gspo_method}'."
    clip = {m: [training_mean(r, "clip/total") for r in runs] for m, runs in groups.items()}
    means = {m: _stats(v)[0] for m, v in clip.items()}
    highest = max(means, key=lambda m: means[m] if np.isfinite(means[m]) else -1)
    by_seed = {r.seed: training_mean(r, "clip/total") for r in gspo}
    pairs = [(training_mean(r, "clip/total"), by_seed[r.seed]) for r in espo if r.seed in by_seed]
    lower_every_seed = bool(pairs) and all(e is not None and g is not None and e < g for e, g in pairs)
    held = highest == plan.gspo_method and lower_every_seed
    listing = ", ".join(f"{m} {fmt(v)}" for m, v in clip.items())
    util = ", ".join(f"{m} {fmt([training_mean(r, 'grad_util/token') for r in runs])}" for m, runs in groups.items())
    return (head + f"{_verdict(held)}. Clip fraction (all tokens, mean over training, mean ± std over seeds): {listing}; "
            f"highest: {highest}; ESPO below GSPO in {sum(e < g for e, g in pairs if e is not None and g is not None)}"
            f"/{len(pairs)} paired seeds. Tokens that carry gradient: {util}.")


RHO_MIN = 0.3  # |Spearman rho| a claim of "rises as entropy falls" needs per seed


def claim_entropy_clip(groups, plan: ComparePlan) -> str:
    head = "2. *ESPO's clip fraction rises as entropy falls (Fig. 5).* "
    espo = groups.get(plan.espo_method)
    if not espo:
        return head + f"Not tested: needs method '{plan.espo_method}'."
    parts, rhos, falls = [], [], []
    for r in espo:
        entropy, clip = r.series("entropy/mean"), r.series("clip/total")
        if entropy is None or clip is None:
            continue
        x, ie, ic = np.intersect1d(entropy.x, clip.x, return_indices=True)
        rho = spearman(entropy.y[ie], clip.y[ic])
        quarter = max(1, len(ie) // 4)
        e0, e1 = entropy.y[ie][:quarter].mean(), entropy.y[ie][-quarter:].mean()
        c0, c1 = clip.y[ic][:quarter].mean(), clip.y[ic][-quarter:].mean()
        rhos.append(rho)
        falls.append(e1 < e0)
        parts.append(f"seed {r.seed}: rank correlation(entropy, clip) {rho:+.2f}, entropy {e0:.3f} → {e1:.3f}, "
                     f"clip {c0:.3f} → {c1:.3f} (first → last quarter)")
    if not rhos:
        return head + "Not tested: the ESPO runs logged no entropy/mean and clip/total."
    if not all(np.isfinite(r) for r in rhos):
        return head + "Not tested: a correlation needs at least 3 rollouts with varying entropy and clip fraction. " + "; ".join(parts) + "."
    held = all(r <= -RHO_MIN for r in rhos)
    note = "" if all(falls) else " Entropy did not fall in every seed, so the claim is only partly exercised."
    return (head + f"{_verdict(held)} (required: rank correlation <= -{RHO_MIN} in every seed, about p < 0.05 over "
            f"40 rollouts). " + "; ".join(parts) + "." + note)


def claim_convergence(groups, plan: ComparePlan) -> str:
    head = "3. *ESPO converges faster and higher than the baselines (Fig. 3, Table 1).* "
    espo = groups.get(plan.espo_method)
    if not espo or len(groups) < 2:
        return head + f"Not tested: needs method '{plan.espo_method}' and at least one baseline."
    target = plan.target_accuracy
    e_final = _stats([final_accuracy(r) for r in espo])
    e_time = [time_to_target(r, target)[1] for r in espo]
    lines, verdicts = [], []
    for method, runs in groups.items():
        if method == plan.espo_method:
            continue
        b_final = _stats([final_accuracy(r) for r in runs])
        b_time = [time_to_target(r, target)[1] for r in runs]
        higher = e_final[0] > b_final[0]
        faster = _mean_rollouts(e_time) < _mean_rollouts(b_time)
        verdicts += [higher, faster]
        spread = max(e_final[1], b_final[1])
        noise = ", within the seed spread" if abs(e_final[0] - b_final[0]) <= spread else ", beyond the seed spread"
        lines.append(f"   - vs {method}: higher {_verdict(higher)} (final accuracy {e_final[0]:.3f} vs {b_final[0]:.3f}"
                     f"{noise} of {spread:.3f}); faster {_verdict(faster)} (rollouts to {target:.2f}: "
                     f"{_rollouts_text(e_time)} vs {_rollouts_text(b_time)})")
    overall = "**held**" if all(verdicts) else "**partly held**" if any(verdicts) else "**not held**"
    return (head + f"{overall}. Higher: ESPO's mean final accuracy above the baseline's; faster: fewer rollouts to "
            f"{target:.2f} on average (a seed that never reaches it counts as never; validation every few rollouts "
            "makes this coarse).\n" + "\n".join(lines))


def accuracy_held(groups, reference: str) -> list[str]:
    """Per method other than ``reference``: whether its final val/accuracy held against the
    reference's, i.e. its mean over seeds is not below the reference's mean by more than the seed band
    (the larger of the two standard deviations over seeds, as in claim 3). One seed each: no band, so
    any drop counts as not held."""
    ref = _stats([final_accuracy(r) for r in groups.get(reference, [])])
    if not ref[2]:
        return [f"- Not tested: the reference method '{reference}' has no finished run with val/accuracy."]
    lines = []
    for method, runs in groups.items():
        if method == reference:
            continue
        own = _stats([final_accuracy(r) for r in runs])
        if not own[2]:
            lines.append(f"- {method}: not tested (no val/accuracy logged).")
            continue
        band, diff = max(ref[1], own[1]), own[0] - ref[0]
        within = abs(diff) <= band + 1e-9  # a difference of exactly the band is within it (float rounding)
        held = within or diff > 0
        lines.append(f"- {method}: {_verdict(held)}: final val/accuracy {own[0]:.3f} ± {own[1]:.3f} ({own[2]} seeds) against "
                     f"{reference} {ref[0]:.3f} ± {ref[1]:.3f} ({ref[2]} seeds), difference {diff:+.3f}, seed band "
                     f"{band:.3f} ({'within' if within else 'above' if diff > 0 else 'below'} it).")
    return lines


def _mean_rollouts(values) -> float:
    return float("inf") if any(v is None for v in values) else float(np.mean(values))


def _rollouts_text(values) -> str:
    reached = [v for v in values if v is not None]
    text = "/".join("never" if v is None else f"{v:.0f}" for v in values)
    return text + ("" if len(reached) < len(values) else f" (mean {np.mean(values):.1f})")


def identical_seeds(groups: dict[str, list[RunCurves]]) -> list[str]:
    """Methods whose seeds logged the very same rewards: the seed did not reach sampling."""
    same = []
    for method, runs in groups.items():
        rewards = [r.series("reward/mean") for r in runs]
        if len(runs) > 1 and all(c is not None for c in rewards) and all(
                len(c.y) == len(rewards[0].y) and np.array_equal(c.y, rewards[0].y) for c in rewards[1:]):
            same.append(method)
    return same


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write(out: Path, plan: ComparePlan, groups: dict[str, list[RunCurves]], figures: dict[str, Path],
          command: str, redone: bool = False, unmarked: list[str] | None = None) -> Path:
    import torch

    captions = {
        "accuracy": "Validation accuracy (greedy, as measured) and training reward (smoothed) over rollouts (paper Fig. 3).",
        "clip_fractions": "Clip fractions per method, low and high (paper Fig. 4).",
        "entropy": "Mean token entropy of the sampling policy per method over training (entropy collapse is what "
                   "SAPO, Clip-Cov, KL-Cov and the entropy mask act against).",
        "entropy_and_clip": "ESPO's mean token entropy (left axis) and clip fraction (right axis) over training (paper Fig. 5).",
        "gradient_utilization": "Gradient utilisation: tokens and responses that carry gradient.",
        "response_length": "Mean response length.",
        "step_time": "Wall-clock per rollout: generation and scoring, and the policy update.",
    }
    lines = [
        "# ESPO against its baselines",
        "",
        f"- Command: `{command}`" + (" (this report redone from its run folders with `--report-only`)" if redone else ""),
        f"- Commit: {_commit()}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        f"- Base config: {', '.join(plan.base)}; overrides: {' '.join(plan.overrides) or 'none'}",
        "- Methods: " + "; ".join(f"{m} = base" + "".join(f" + {c}" for c in o) for m, o in plan.methods.items()),
        f"- Seeds: {', '.join(map(str, plan.seeds))}; curves are the mean over seeds, shaded from the lowest to the "
        f"highest seed, EMA-smoothed with weight {plan.smooth} (validation drawn as measured)",
        *([f"- Reported as found, without a finished marker (trained outside this command, or interrupted): "
           f"{', '.join(unmarked)}"] if unmarked else []),
        "",
        "## Results (mean ± std over seeds)",
        "",
        *([f"**Warning**: the seeds of {', '.join(identical_seeds(groups))} logged identical rewards: the seed did not "
           "reach sampling (set data.seed per seed), so the spread below is not a spread over seeds.", ""]
          if identical_seeds(groups) else []),
        table(groups, plan.target_accuracy),
        "",
        "Clip fractions, tokens with gradient and response length are per-rollout values averaged over "
        "training; s / step is the median rollout's generation, scoring and update time divided by its "
        "optimizer steps; time to target is wall-clock from the evaluation before the first update.",
        "",
        *([f"## Final accuracy against {plan.reference_method}", "",
           "Held: the method's mean final val/accuracy is not below the reference's by more than the seed band "
           "(the larger standard deviation over seeds of the two).", "",
           *accuracy_held(groups, plan.reference_method), ""] if plan.reference_method else []),
        *(["## The paper's claims at this scale", "",
           claim_underutilization(groups, plan),
           claim_entropy_clip(groups, plan),
           claim_convergence(groups, plan), ""] if plan.paper_claims else []),
        "## Figures",
        "",
    ]
    for name, path in figures.items():
        lines += [f"![{name}]({path.name})", "", captions.get(name, ""), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
