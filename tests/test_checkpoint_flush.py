"""Sharded checkpoints on a filesystem shared by several nodes: each rank writes its own shard, and
only an fsync on the node that wrote it flushes its pages. Lightning saves shards through
torch.distributed.checkpoint's FileSystemWriter, which fsyncs each file on the rank that wrote it
(``sync_files=True``); rank 0 flushes the rest and the folder after the rename. Checked on 2 gloo
ranks with real files: every rank's own shard is fsynced by that rank, before rank 0 commits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_every_rank_flushes_its_own_shard(tiny_model_dir, tmp_path):
    log = tmp_path / "fsync"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "espo_lightning", "fit", "--config", str(REPO / "conf/quickstart_fsdp.yaml"),
         "--model.model_name_or_path", tiny_model_dir, "--model.model_builder", "null",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
         "--data.prompts_per_rollout", "4", "--data.num_generations", "2", "--data.minibatch_size", "4",
         "--trainer.callbacks+=flush_toys.RecordFlushes", "--trainer.callbacks.init_args.log_path", str(log)],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt" / "__1_0.distcp").exists()
    for rank in (0, 1):
        flushed = [Path(json.loads(line)).name for line in Path(f"{log}.{rank}").read_text().splitlines()]
        assert f"__{rank}_0.distcp" in flushed, (rank, flushed)
    assert "checkpoints" in [Path(json.loads(line)).name for line in Path(f"{log}.0").read_text().splitlines()]
