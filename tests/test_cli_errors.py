"""Bad input gets a one-line error naming the key or row and what is allowed, exit code non-zero."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "espo_lightning", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def last_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


QUICK = ["fit", "--config", str(REPO / "conf/quickstart.yaml")]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data.num_generations", "1"], "data.num_generations must be >= 2"),
        (["--model.optimizer.init_args.lr", "-0.1"], "model.optimizer"),
        (["--model.loss.class_path", "espo_lightning.losses.NoSuchLoss"], "NoSuchLoss"),
        (["--model.loss.init_args.high_entropy_fraction", "1.5"], "high_entropy_fraction"),
    ],
)
def test_bad_values_fail_fast_with_one_line(extra, expected, tmp_path):
    proc = run_cli(*QUICK, "--trainer.default_root_dir", str(tmp_path), *extra)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _gsm8k_args(train: Path, tmp_path: Path) -> list[str]:
    return ["fit", "--config", str(REPO / "conf/gsm8k.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--data.train_data.init_args.path", str(train), "--data.val_data.init_args.path", str(train)]


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = run_cli(*_gsm8k_args(missing, tmp_path))
    assert proc.returncode != 0
    line = last_error_line(proc)
    assert line.startswith("error:") and str(missing) in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_row_without_answer_column(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    proc = run_cli(*_gsm8k_args(data, tmp_path))
    assert proc.returncode != 0
    line = last_error_line(proc)
    assert line.startswith("error:") and "row 2" in line and "answer" in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
