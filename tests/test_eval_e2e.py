"""``conf/eval_embedded.yaml`` end to end through the real CLI on the tiny model: fit two rollouts
with two evaluation sets (greedy, and k = 4 samples), then ``validate`` the last checkpoint, the
exported HF folder, and the checkpoint again on 2 processes (DDP, gloo): every one gives exactly the
numbers of the run's last in-training evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eval_toys import digit_sum
from espo_lightning.cli import main
from espo_lightning.tasks.addition import AdditionSource

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def small(model_dir: str, root: Path) -> list[str]:
    """The embedded config, shrunk: 15 greedy problems and 9 with 4 samples (odd counts: on 2 ranks
    the second rank pads with a weight-0 repeat), and a reward whose verdicts are known in advance
    (``eval_toys.alternating_samples``: 2 of each problem's 4 samples, a greedy sample iff the
    prompt's digit sum is odd), so the metrics are derived by hand, not left to what the model
    learnt on this machine."""
    return ["--config", str(REPO / "conf/eval_embedded.yaml"), "--model.model_name_or_path", model_dir,
            "--model.model_builder", "null", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.val_data.addition.init_args.num_problems", "15",
            "--data.val_data.addition_k4.source.init_args.num_problems", "9", "--data.val_batch_size", "4",
            "--data.val_samples_per_set", "10",
            "--data.reward_funcs", "[eval_toys.alternating_samples]"]


def run(args: list[str]) -> None:
    sys.argv = sys.argv[:1]
    main(args)


def tensorboard(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalars by tag, and the text tags."""
    scalars, texts = {}, []
    for f in sorted(folder.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        texts += acc.Tags().get("tensors", [])
    return scalars, texts


def summary(folder: Path, version: int = 0) -> dict:
    return json.loads((folder / "lightning_logs" / f"version_{version}" / "eval_summary.json").read_text())


def test_fit_then_validate_checkpoint_export_and_two_ranks(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    run(["fit"] + small(tiny_model_dir, root) + [
        "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--data.prompts_per_rollout", "4",
        "--data.num_generations", "4", "--data.minibatch_size", "8"])
    logs = root / "lightning_logs" / "version_0"
    scalars, texts = tensorboard(logs)
    names = ["val/addition/accuracy", "val/addition/response_len_mean", "val/addition/truncated_frac",
             "val/addition_k4/avg@4", "val/addition_k4/pass@1", "val/addition_k4/pass@2", "val/addition_k4/pass@4",
             "val/addition_k4/response_len_mean", "val/addition_k4/truncated_frac"]
    assert sorted(t for t in scalars if t.startswith("val/")) == sorted(names)
    assert all(len(scalars[n]) == 3 for n in names), "before the first update and after each rollout"
    assert {"val/addition/samples/text_summary", "val/addition_k4/samples/text_summary"} <= set(texts)
    trained = summary(root)
    assert (trained["stage"], trained["step"], trained["sets"]["addition_k4"]["problems"]) == ("fit", 4, 9)
    last = trained["metrics"]
    assert sorted(last) == sorted(names)
    assert all(scalars[n][-1][1] == pytest.approx(last[n], rel=1e-6) for n in names)  # TB holds float32
    assert last["val/addition_k4/pass@1"] == pytest.approx(last["val/addition_k4/avg@4"], abs=1e-12)
    assert last["val/addition_k4/avg@4"] <= last["val/addition_k4/pass@2"] <= last["val/addition_k4/pass@4"]
    # by hand: 2 of 4 samples correct for every problem; pass@2 = 1 - C(2, 2) / C(4, 2) = 5/6
    greedy_prompts = [r["prompt"] for r in AdditionSource(num_problems=15, seed=999999).rows()]
    k4_prompts = [r["prompt"] for r in AdditionSource(num_problems=9, seed=424242).rows()]
    assert len(set(greedy_prompts)) == 15 and len(set(k4_prompts)) == 9  # no prompt repeats in a set
    odd = sum(digit_sum(p) % 2 for p in greedy_prompts)
    assert 0 < odd < 15
    assert last["val/addition/accuracy"] == odd / 15
    assert (last["val/addition_k4/avg@4"], last["val/addition_k4/pass@1"]) == (0.5, 0.5)
    assert last["val/addition_k4/pass@2"] == pytest.approx(5 / 6, abs=1e-12)
    assert last["val/addition_k4/pass@4"] == 1.0

    # the written samples: 10 of the 36, with each completion's verdict
    lines = (logs / "eval_samples" / "addition_k4_step4.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == 10  # all 4 samples of the first problems, cut at data.val_samples_per_set
    assert [(s["index"], s["sample"]) for s in samples[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert all(s["correct"] == bool((digit_sum(s["prompt"]) + s["sample"]) % 2) for s in samples)
    assert [s["prompt"] for s in samples[::4]] == k4_prompts[:3]
    assert sorted(p.name for p in (logs / "eval_samples").iterdir()) == sorted(
        f"{name}_step{step}.jsonl" for name in ("addition", "addition_k4") for step in (0, 2, 4))

    # validate: the run's last checkpoint (into the run's next log folder), the exported folder, and
    # the checkpoint on 2 ranks
    ckpt = root / "checkpoints" / "last.ckpt"
    run(["validate"] + small(tiny_model_dir, root) + ["--ckpt_path", "last"])
    from_ckpt = summary(root, version=1)
    assert (from_ckpt["stage"], from_ckpt["step"], from_ckpt["ckpt_path"]) == ("validate", 4, str(ckpt))
    assert from_ckpt["metrics"] == last
    ckpt_scalars, _ = tensorboard(root / "lightning_logs" / "version_1")
    assert {n: ckpt_scalars[n] for n in names} == {n: [(4, pytest.approx(last[n], rel=1e-6))] for n in names}

    run(["validate"] + small(str(logs / "policy"), tmp_path / "export"))
    assert summary(tmp_path / "export")["metrics"] == last

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "espo_lightning", "validate", *small(tiny_model_dir, tmp_path / "ddp"),
                           "--ckpt_path", str(ckpt), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = summary(tmp_path / "ddp")
    assert two["metrics"] == last and two["sets"]["addition"]["problems"] == 15
    one_samples = root / "lightning_logs" / "version_1" / "eval_samples" / "addition_k4_step4.jsonl"
    two_samples = (tmp_path / "ddp" / "lightning_logs" / "version_0" / "eval_samples" / "addition_k4_step4.jsonl")
    assert two_samples.read_text() == one_samples.read_text()
