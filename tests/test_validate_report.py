"""``validate`` ends by printing every set's metrics as a table and the path of the
``eval_summary.json`` it wrote (rank 0, stdout)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from espo_lightning.evaluation.report import format_report

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run_cli(subcommand: str, model_dir: str, root: Path, *extra: str,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """One rollout of 4 prompts x 4 completions, 8 validation problems (seconds on a CPU)."""
    args = [sys.executable, "-m", "espo_lightning", subcommand, "--config", str(REPO / "conf/quickstart.yaml"),
            "--model.model_name_or_path", model_dir, "--model.model_builder", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--data.prompts_per_rollout", "4",
            "--data.num_generations", "4", "--data.minibatch_size", "8",
            "--data.val_data.init_args.num_problems", "8", *extra]
    env = os.environ if env is None else env
    env = {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(args, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_validate_last_prints_metrics_and_summary_path(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    run_cli("fit", tiny_model_dir, root)
    out = run_cli("validate", tiny_model_dir, root, "--ckpt_path", "last").stdout

    paths = re.findall(r"^eval_summary\.json: (.+)$", out, flags=re.M)
    assert len(paths) == 1, out
    summary_path = Path(paths[0])
    assert summary_path.is_file() and summary_path.parent.parent == root / "lightning_logs", out
    summary = json.loads(summary_path.read_text())
    assert summary["stage"] == "validate" and summary["ckpt_path"] == str(root / "checkpoints" / "last.ckpt")
    assert f"evaluated {summary['ckpt_path']} (step {summary['step']})" in out

    printed = {m: float(v) for m, v in re.findall(r"(val/\S+)\s+(-?\d+\.\d{4})\s*$", out, flags=re.M)}
    assert set(printed) == set(summary["metrics"]) >= {"val/accuracy", "val/response_len_mean", "val/truncated_frac"}
    for name, value in summary["metrics"].items():
        assert printed[name] == round(value, 4), (name, out)

    # two ranks (the second one's stdout is the same pipe): the table and the path once, from rank 0
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    out = run_cli("validate", tiny_model_dir, root, "--ckpt_path", "last", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", env=env).stdout
    assert len(re.findall(r"^eval_summary\.json: ", out, flags=re.M)) == 1, out
    assert len(re.findall(r"val/accuracy\s", out)) == 1, out


def test_report_table_has_every_set_and_metric():
    summary = {
        "stage": "validate", "step": 12, "model": "m", "ckpt_path": "runs/x/last.ckpt",
        "sets": {
            "addition": {"problems": 300, "k": 1, "greedy": True,
                         "metrics": {"val/addition/accuracy": 0.74333333, "val/addition/response_len_mean": 3.99,
                                     "val/addition/truncated_frac": 0.0}},
            "sampled": {"problems": 50, "k": 8, "greedy": False,
                        "metrics": {"val/sampled/avg@8": 0.5, "val/sampled/pass@1": 0.5, "val/sampled/pass@8": 0.9,
                                    "val/sampled/response_len_mean": 4.0, "val/sampled/truncated_frac": 0.125}},
        },
    }
    lines = format_report(summary, "runs/x/lightning_logs/version_1/eval_summary.json").splitlines()
    assert lines[0] == "evaluated runs/x/last.ckpt (step 12)"
    assert lines[1].split() == ["set", "problems", "mode", "metric", "value"]
    assert lines[2].split() == ["addition", "300", "greedy", "val/addition/accuracy", "0.7433"]
    assert lines[5].split() == ["sampled", "50", "k=8", "val/sampled/avg@8", "0.5000"]
    assert lines[7].split() == ["val/sampled/pass@8", "0.9000"]
    assert len({line.index(line.split()[-1]) + len(line.split()[-1]) for line in lines[1:-1]}) == 1  # values aligned
    assert lines[-1] == "eval_summary.json: runs/x/lightning_logs/version_1/eval_summary.json"
    assert format_report(summary, None).splitlines()[-1].startswith("eval_summary.json: not written")
