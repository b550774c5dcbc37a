"""``python -m espo_lightning.compare``: the comparison file is checked, the statistics are right by
hand, and a minimal comparison (2 methods x 1 seed x 2 rollouts of real training) writes its report
and figures, skips its finished runs when run again and redraws with ``--report-only``; the runner
restarts an unfinished run and stops on a failed one (real subprocesses)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from espo_lightning.compare.__main__ import main
from espo_lightning.compare.curves import RunCurves, band, spearman, time_to_target
from espo_lightning.compare.plan import Run, load_plan
from espo_lightning.compare.runner import MARKER, RunFailed, execute, finished
from espo_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, **raw) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_composes_base_overlays_and_seeds(tmp_path):
    plan = load_plan(_write(tmp_path, base=str(REPO / "conf/chain.yaml"), methods={"ESPO": [], "GSPO": str(REPO / "conf/gspo.yaml")},
                            seeds=[0, 1], overrides=["--trainer.max_epochs=3"], target_accuracy=0.7))
    runs = plan.runs(tmp_path / "out")
    assert [(r.method, r.seed) for r in runs] == [("ESPO", 0), ("ESPO", 1), ("GSPO", 0), ("GSPO", 1)]
    gspo = runs[3].command
    assert gspo[gspo.index("fit") + 1:][:4] == ["--config", str(REPO / "conf/chain.yaml"), "--config", str(REPO / "conf/gspo.yaml")]
    assert "--seed_everything=1" in gspo and "--data.seed=1" in gspo and gspo[-1] == "--trainer.max_epochs=3"
    assert f"--trainer.default_root_dir={tmp_path / 'out' / 'runs' / 'GSPO' / 'seed1'}" in gspo
    assert plan.target_accuracy == 0.7


@pytest.mark.parametrize("raw,match", [
    ({"methods": {"A": []}, "seeds": [0]}, "'base' is required"),
    ({"base": "conf/chain.yaml", "methods": {"A": []}, "seeds": [0], "sedes": 1}, r"unknown key\(s\) \['sedes'\]"),
    ({"base": "conf/chain.yaml", "methods": {"A": []}, "seeds": [0, 0]}, "'seeds' must be a non-empty list of distinct"),
    ({"base": "conf/nope.yaml", "methods": {"A": []}, "seeds": [0]}, "config file conf/nope.yaml does not exist"),
    ({"base": "conf/chain.yaml", "methods": {"a/b": []}, "seeds": [0]}, "method names become folder names"),
    ({"base": "conf/chain.yaml", "methods": {"A": []}, "seeds": [0], "overrides": ["max_epochs=3"]}, "'overrides' must be"),
    ({"base": "conf/chain.yaml", "methods": {"A": []}, "seeds": [0], "target_accuracy": 2}, "'target_accuracy' must be"),
])
def test_plan_mistakes_are_one_line_naming_the_key(tmp_path, monkeypatch, raw, match):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=match):
        load_plan(_write(tmp_path, **raw))


def test_the_shipped_comparison_file_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # it names configs relative to the repository root
    plan = load_plan("conf/compare.yaml")
    assert {"ESPO", "GSPO", "GRPO", "DAPO"} <= set(plan.methods) and len(plan.seeds) >= 3


def test_reference_method_must_be_a_method_and_paper_claims_a_bool(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    base = {"base": "conf/chain.yaml", "methods": {"A": [], "B": []}, "seeds": [0]}
    plan = load_plan(_write(tmp_path, **base, reference_method="A", paper_claims=False))
    assert plan.reference_method == "A" and plan.paper_claims is False
    assert load_plan(_write(tmp_path, **base)).reference_method is None
    with pytest.raises(ConfigError, match=r"'reference_method' must name one of the methods \['A', 'B'\], got 'C'"):
        load_plan(_write(tmp_path, **base, reference_method="C"))
    with pytest.raises(ConfigError, match="'paper_claims' must be true or false"):
        load_plan(_write(tmp_path, **base, paper_claims="no"))


def _final(seed: int, accuracy: float) -> RunCurves:
    return RunCurves("M", seed, {"val/accuracy": (np.array([0, 7]), np.array([0.5, accuracy]), np.array([0.0, 1.0])),
                                 "reward/mean": (np.array([3, 7]), np.array([0.1, 0.2]), np.array([0.5, 1.0]))},
                     steps_per_rollout=4)


def test_accuracy_held_against_the_reference_within_the_seed_band(tmp_path):
    """Final accuracies: reference 0.70, 0.72, 0.74 (mean 0.72, std 0.02); "near" 0.69, 0.70, 0.71
    (mean 0.70, std 0.01): -0.02, within the band max(0.02, 0.01) = 0.02, held; "low" 0.60, 0.61,
    0.62: -0.11, below it, not held; "high" 0.80 (one seed, std 0): +0.08, above it, held."""
    from espo_lightning.compare.plan import ComparePlan
    from espo_lightning.compare.report import accuracy_held, write

    groups = {"sync": [_final(s, a) for s, a in enumerate([0.70, 0.72, 0.74])],
              "near": [_final(s, a) for s, a in enumerate([0.69, 0.70, 0.71])],
              "low": [_final(s, a) for s, a in enumerate([0.60, 0.61, 0.62])],
              "high": [_final(0, 0.80)]}
    near, low, high = accuracy_held(groups, "sync")
    assert near.startswith("- near: **held**: final val/accuracy 0.700 ± 0.010 (3 seeds) against sync 0.720 ± 0.020 "
                           "(3 seeds), difference -0.020, seed band 0.020 (within it)"), near
    assert low.startswith("- low: **not held**") and "difference -0.110" in low and "(below it)" in low, low
    assert high.startswith("- high: **held**") and "(1 seeds)" in high and "(above it)" in high, high
    assert accuracy_held({"other": groups["near"]}, "sync")[0].startswith("- Not tested")
    # the report gets the section and, without the paper's claims, none of them
    plan = ComparePlan(base=[], methods={m: [] for m in groups}, seeds=[0, 1, 2], reference_method="sync",
                       paper_claims=False)
    text = write(tmp_path, plan, groups, {}, "cmd").read_text()
    assert "## Final accuracy against sync" in text and near in text and "The paper's claims" not in text


def test_spearman_by_hand():
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.0, 1.0, 2.0])) == pytest.approx(-0.8)
    # ties take the mean rank: ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3): r = 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0])))


def _run(seed: int, accuracy: list[float], walls: list[float], reward: list[float]) -> RunCurves:
    # 4 optimizer steps per rollout; validation before the first update and after rollouts 2 and 4
    tags = {"val/accuracy": (np.array([0, 7, 15]), np.array(accuracy), np.array(walls)),
            "reward/mean": (np.array([3, 7, 11, 15]), np.array(reward), np.array(walls[:1] * 4) + 1.0)}
    return RunCurves("M", seed, tags, steps_per_rollout=4)


def test_rollouts_time_to_target_and_band_by_hand():
    a = _run(0, [0.3, 0.6, 0.8], [100.0, 130.0, 170.0], [0.1, 0.2, 0.3, 0.4])
    b = _run(1, [0.4, 0.5, 0.9], [200.0, 220.0, 260.0], [0.3, 0.2, 0.5, 0.6])
    assert list(a.series("val/accuracy").x) == [0, 2, 4] and list(a.series("reward/mean").x) == [1, 2, 3, 4]
    assert time_to_target(a, 0.6) == (30.0, 2.0) and time_to_target(b, 0.6) == (60.0, 4.0)
    assert time_to_target(a, 0.95) == (None, None)
    rewards = band([a, b], "reward/mean")
    np.testing.assert_allclose(rewards.mean, [0.2, 0.2, 0.4, 0.5])
    np.testing.assert_allclose(rewards.low, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(rewards.high, [0.3, 0.2, 0.5, 0.6])


FIGURES = {"accuracy.png", "clip_fractions.png", "entropy_vs_clip.png", "gradient_utilization.png",
           "response_length.png", "step_time.png"}


@pytest.mark.slow
def test_minimal_comparison_writes_report_and_figures_and_resumes(tmp_path, tiny_model_dir, capsys):
    config = _write(tmp_path, base=str(REPO / "conf/quickstart.yaml"),
                    methods={"ESPO": [], "GSPO": [str(REPO / "conf/gspo.yaml")]}, seeds=[0], target_accuracy=0.05,
                    overrides=[f"--model.model_name_or_path={tiny_model_dir}", "--model.model_builder=null",
                               "--model.export_dir=null", "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1",
                               "--data.prompts_per_rollout=4", "--data.num_generations=4", "--data.minibatch_size=8",
                               "--data.val_data.init_args.num_problems=8", "--data.val_batch_size=8"])
    out = tmp_path / "out"
    main(["--config", str(config), "--out", str(out)])
    report = (out / "report.md").read_text()
    assert FIGURES <= {p.name for p in out.glob("*.png")}
    for name in FIGURES:
        assert f"]({name})" in report
    assert f"--config {config} --out {out}" in report and "Commit:" in report
    assert "| ESPO | 0 |" in report and "| GSPO | 0 |" in report
    for claim in ("1. *GSPO", "2. *ESPO", "3. *ESPO"):
        assert claim in report
    marker = json.loads((out / "runs" / "GSPO" / "seed0" / "compare_run.json").read_text())
    assert marker["command"][-1] == "--data.val_batch_size=8"

    # Run again: both finished, nothing trains; the report is redone.
    capsys.readouterr()
    main(["--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert "ESPO seed 0: finished before, skipped" in err and "GSPO seed 0: finished before, skipped" in err

    for png in out.glob("*.png"):
        png.unlink()
    main(["--config", str(config), "--out", str(out), "--report-only"])
    assert FIGURES <= {p.name for p in out.glob("*.png")}
    assert "report redone from its run folders with `--report-only`" in (out / "report.md").read_text()

    # A run trained outside this command (no marker) is reported as found, and named.
    (out / "runs" / "GSPO" / "seed0" / "compare_run.json").unlink()
    main(["--config", str(config), "--out", str(out), "--report-only"])
    report = (out / "report.md").read_text()
    assert "| GSPO | 0 |" in report and "without a finished marker (trained outside this command, or interrupted): GSPO seed 0" in report


def _runs(tmp_path, *scripts) -> list[Run]:
    return [Run("M", seed, tmp_path / f"seed{seed}", [sys.executable, "-c", script]) for seed, script in enumerate(scripts)]


def test_runner_skips_finished_runs_and_restarts_unfinished_ones(tmp_path):
    runs = _runs(tmp_path, "print('zero')", "print('one')")
    execute(runs, log=lambda m: None)
    assert all(finished(r) for r in runs) and (runs[1].folder / "train.log").read_text() == "one\n"
    (runs[0].folder / MARKER).unlink()  # interrupted: trained but not marked
    (runs[0].folder / "stale").write_text("half a run")
    messages = []
    execute(runs, log=messages.append)
    assert any("M seed 0: unfinished run folder cleared" in m for m in messages)
    assert any("M seed 1: finished before, skipped" in m for m in messages)
    assert not (runs[0].folder / "stale").exists() and finished(runs[0])
    changed = _runs(tmp_path, "print('zero')", "print('changed')")  # another command is another run
    assert finished(changed[0]) and not finished(changed[1])


def test_a_failed_run_stops_naming_the_run_its_last_line_and_log(tmp_path):
    runs = _runs(tmp_path, "import sys; print('error: data.train_data: no rows'); sys.exit(2)", "print('never')")
    with pytest.raises(RunFailed, match=r"M seed 0 failed \(exit 2\) after \d+s: error: data.train_data: no rows "
                                        r"\(full log: .*seed0/train.log\)"):
        execute(runs, log=lambda m: None)
    assert not finished(runs[0]) and not runs[1].folder.exists()


def test_report_only_without_runs_is_an_error(tmp_path, capsys):
    config = _write(tmp_path, base=str(REPO / "conf/chain.yaml"), methods={"ESPO": []}, seeds=[0])
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--out", str(tmp_path / "none"), "--report-only"])
    assert exit_info.value.code == 2
    assert "no finished runs of this comparison" in capsys.readouterr().err


def _espo_run(seed: int, entropy, clip, reward) -> RunCurves:
    steps = np.arange(len(entropy)) * 4 + 3  # per-rollout aggregates at each rollout's last step
    walls = np.arange(len(entropy), dtype=float)
    return RunCurves("ESPO", seed, {"entropy/mean_epoch": (steps, np.array(entropy, float), walls),
                                    "clip/total_epoch": (steps, np.array(clip, float), walls),
                                    "reward/mean": (steps, np.array(reward, float), walls),
                                    "entropy_group/0/clip_frac_epoch": (steps, np.zeros(len(entropy)), walls)},
                     steps_per_rollout=4)


def test_claim_two_needs_a_clear_negative_correlation_in_every_seed():
    from espo_lightning.compare.plan import ComparePlan
    from espo_lightning.compare.report import claim_entropy_clip, identical_seeds

    plan = ComparePlan(base=[], methods={"ESPO": []}, seeds=[0, 1])
    falling = [0.5, 0.4, 0.3, 0.2, 0.1]
    rising = [0.1, 0.2, 0.3, 0.25, 0.4]
    held = claim_entropy_clip({"ESPO": [_espo_run(0, falling, rising, [0] * 5), _espo_run(1, falling, rising, [1] * 5)]}, plan)
    assert "**held**" in held and "seed 0: rank correlation(entropy, clip) -0.90" in held
    weak = claim_entropy_clip({"ESPO": [_espo_run(0, falling, rising, [0] * 5),
                                        _espo_run(1, falling, [0.2, 0.1, 0.3, 0.25, 0.15], [1] * 5)]}, plan)
    assert "**not held**" in weak and "seed 1: rank correlation(entropy, clip) -0.10" in weak
    same = {"ESPO": [_espo_run(0, falling, rising, [0.2] * 5), _espo_run(1, falling, rising, [0.2] * 5)]}
    assert identical_seeds(same) == ["ESPO"] and identical_seeds({"ESPO": same["ESPO"][:1]}) == []
