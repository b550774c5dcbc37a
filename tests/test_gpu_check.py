"""``benchmarks/gpu_check.py``: ``--tiny`` runs the one-GPU check on the CPU (a tiny Qwen3-shaped
model at V = 151,936, 2 rollouts under bf16-mixed with the fused head), prints its table and exits
0 with the on-policy ratio exactly 1; a broken setting (attention dropout kept in training, so the
scoring pass and the first update drop different weights) makes the ratio line fail and the script
exit 1; without ``--tiny`` on a machine without CUDA it stops with one line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cells(stdout: str, check: str) -> list[str]:
    """The cells of the table line whose first cell starts with ``check``."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0].startswith(check):
            return cells
    raise AssertionError(f"no table line {check!r} in:\n{stdout}")


@pytest.mark.slow
def test_tiny_check_prints_its_table_and_passes():
    proc = _run("--tiny")
    assert proc.returncode == 0, f"gpu_check --tiny failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    out = proc.stdout
    header = _cells(out, "check")
    assert [c.strip() for c in header] == ["check", "measured", "expected", "verdict"], header
    ratio = _cells(out, "on-policy ratio")
    assert re.match(r"0 \(max \|logp - old\| 0, 2 rollouts\)$", ratio[1]), ratio  # exactly 1: |ratio - 1| = 0
    assert ratio[3] == "must: pass"
    assert _cells(out, "clip/total")[1:] == ["0", "exactly 0", "must: pass"]
    assert _cells(out, "fused LM head")[1] == "on"
    for tokens in (64, 128, 256):
        assert _cells(out, f"step peak memory, {tokens} tokens")[2].startswith("model ")
        assert _cells(out, f"training tokens/s, {tokens} tokens")[1]
    assert float(_cells(out, "generation tokens/s")[1].split()[0].replace(",", "")) > 0
    assert float(_cells(out, "training tokens/s (fit")[1].split()[0].replace(",", "")) > 0
    assert "every must line passed" in out


@pytest.mark.slow
def test_a_ratio_that_is_not_one_fails_the_check():
    proc = _run("--tiny", "--keep-dropout", "0.5")
    assert proc.returncode == 1, f"expected exit 1:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    ratio = _cells(proc.stdout, "on-policy ratio")
    assert ratio[3] == "must: FAIL" and float(ratio[1].split()[0]) > 0, ratio
    assert "gpu_check: FAILED: " in proc.stdout and "on-policy ratio" in proc.stdout.splitlines()[-1]


def test_full_check_without_cuda_stops_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full check would run")
    proc = _run(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--tiny" in lines[0], proc.stderr
    assert proc.stdout == ""
