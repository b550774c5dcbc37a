"""End to end through the real CLI on the tiny model: fit 2 epochs (rollouts), TensorBoard files,
the saved config, a checkpoint that resumes, an exported HF folder that loads, and `validate`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from espo_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def tiny_args(model_dir: str, root: Path, epochs: int = 2) -> list[str]:
    return ["--config", str(REPO / "conf/quickstart.yaml"),
            "--model.model_name_or_path", model_dir, "--model.model_builder", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
            "--data.prompts_per_rollout", "4", "--data.num_generations", "4", "--data.minibatch_size", "8",
            "--data.ppo_epochs", "2", "--data.val_data.init_args.num_problems", "16",
            # the barely trained tiny model is never right; a reward on the first digit gives the
            # groups reward variance, so updates really happen
            "--data.reward_funcs", '[{class_path: espo_lightning.rewards.RegexFormatReward, init_args: {pattern: "^1"}}]',
            "--data.accuracy_reward", "espo_lightning.rewards.exact_match"]


def run(args: list[str]) -> None:
    sys.argv = sys.argv[:1]
    main(args)


def test_fit_two_epochs_resume_and_export(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    run(["fit"] + tiny_args(tiny_model_dir, root))
    version = root / "lightning_logs" / "version_0"
    assert (version / "config.yaml").exists()
    tags = scalars(version)
    steps = [s for s, _ in tags["val/accuracy"]]
    assert steps[0] == 0 and len(steps) == 3, "validated before the first update and after each epoch"
    assert len(tags["loss/policy"]) == 2 * 2 * 2  # epochs x ppo_epochs x minibatches
    assert all(torch.isfinite(torch.tensor(v)) for t in tags.values() for _, v in t)

    # the exported folder is a plain HF checkpoint equal to the trained policy
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(version / "policy")
    ckpt = root / "checkpoints" / "last.ckpt"  # saved after every rollout, loadable with weights_only
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("reference.") for k in state)
    exported_state = exported.state_dict()
    assert set(exported_state) == {k[len("policy."):] for k in state if k.startswith("policy.")}
    for name, value in exported_state.items():
        assert torch.equal(value, state[f"policy.{name}"]), name
    # every trained tensor moved (AdamW steps every parameter that has a gradient)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    unmoved = [n for n, p in exported.named_parameters() if torch.equal(p, start[n])]
    assert not unmoved, f"not trained: {unmoved}"

    # resume from the checkpoint for one more rollout
    run(["fit"] + tiny_args(tiny_model_dir, root, epochs=3) + ["--ckpt_path", "last"])
    resumed = scalars(root / "lightning_logs" / "version_1")
    assert max(s for s, _ in resumed["loss/policy"]) == 3 * 4 - 1  # steps continue from 8

    # validate alone
    run(["validate"] + tiny_args(tiny_model_dir, tmp_path / "val"))
    assert scalars(tmp_path / "val")["val/accuracy"]
