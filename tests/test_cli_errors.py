"""Bad input gets a one-line error naming the key or row and what is allowed, exit code non-zero,
and nothing is trained or written first."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from espo_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["fit", "--config", str(REPO / "conf/quickstart.yaml")]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    sys.argv = sys.argv[:1]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data.num_generations", "1"], "data.num_generations must be >= 2 (advantages compare responses within a group), got 1"),
        (["--model.optimizer.init_args.lr", "-0.1"], "model.optimizer: Invalid learning rate: -0.1"),
        (["--model.loss.class_path", "espo_lightning.losses.NoSuchLoss"], "model.loss: Problem with given class_path 'espo_lightning.losses.NoSuchLoss'"),
        (["--data.num_generationz", "3"], "unrecognized arguments: --data.num_generationz"),
        (["--model.loss.init_args.high_entropy_fraction", "1.5"], "high_entropy_fraction must be in"),
        (["--model.micro_batch_size", "0"], "model.micro_batch_size must be an integer >= 1 or null, got 0"),
    ],
)
def test_bad_values_fail_fast_with_one_line(extra, expected, tmp_path, capsys):
    code, err = run_main(QUICK + ["--trainer.default_root_dir", str(tmp_path)] + extra, capsys)
    assert code != 0
    assert expected in error_line(err), err[-2000:]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def _gsm8k_args(train: Path, tmp_path: Path) -> list[str]:
    return ["fit", "--config", str(REPO / "conf/gsm8k.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--data.train_data.init_args.path", str(train), "--data.val_data.init_args.path", str(train)]


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code, err = run_main(_gsm8k_args(missing, tmp_path), capsys)
    line = error_line(err)
    assert code != 0 and line.startswith("error: data.train_data:") and str(missing) in line, err[-2000:]


def test_row_without_answer_column(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    code, err = run_main(_gsm8k_args(data, tmp_path), capsys)
    line = error_line(err)
    assert code != 0 and line.startswith("error: data.train_data:") and "row 2" in line and "'answer'" in line, err[-2000:]


@pytest.mark.slow
def test_real_process_exit_code(tmp_path):
    """The same path through a real ``python -m espo_lightning`` process: exit code 2, one line."""
    proc = subprocess.run([sys.executable, "-m", "espo_lightning", *QUICK, "--trainer.default_root_dir", str(tmp_path),
                           "--data.num_generations", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert error_line(proc.stderr) == "error: data.num_generations must be >= 2 (advantages compare responses within a group), got 0"
