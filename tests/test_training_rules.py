"""Wiring every setting shares, checked in real fits on the tiny model against computations made
independently of the code under test: the KL reference against the starting checkpoint loaded on its
own, the learning-rate schedule against its formula (and across a resume), no optimizer step on a
minibatch without a valid token, the ``accumulate_grad_batches`` refusal and ``best.ckpt``."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from espo_lightning.run.checkpointing import RolloutCheckpoint
from espo_lightning.errors import ConfigError
from espo_lightning.losses import ESPOLoss, GRPOLoss
from espo_lightning.training.module import PolicyModule
from espo_lightning.rollout.datamodule import RolloutDataModule
from espo_lightning.tasks.addition import AdditionSource
from rollout_toys import toy_rollout


def alternating(prompts, completions, **kw):
    """0, 1, 0, 1, ... : every group has reward variance whatever was sampled, so every step updates."""
    return [float(i % 2) for i in range(len(completions))]


def datamodule(**kwargs) -> RolloutDataModule:
    kwargs = {"prompts_per_rollout": 4, "num_generations": 4, "minibatch_size": 8, "max_new_tokens": 4,
              "reward_funcs": [alternating], **kwargs}
    return RolloutDataModule(train_data=AdditionSource(num_problems=50, seed=3), **kwargs)


def trainer(root, epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    """A Trainer as the CLI configures one (a rollout per epoch), without validation or a logger."""
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                     log_every_n_steps=1, default_root_dir=str(root), callbacks=list(callbacks),
                     enable_checkpointing=any(isinstance(c, RolloutCheckpoint) for c in callbacks), **kwargs)


class Record(L.Callback):
    """Each step's minibatch (cloned), its metrics, ``loss/kl`` as written and the learning rate."""

    def __init__(self):
        self.batches, self.kl, self.lrs = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        b = outputs["batch"]
        self.batches.append({**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()},
                             "prompt_length": b.prompt_length})
        self.kl.append(float(trainer.callback_metrics["loss/kl"]) if "loss/kl" in trainer.callback_metrics else None)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def independent_logprobs(model, b: dict) -> torch.Tensor:
    """Log-probs of each row's completion tokens, one unpadded row at a time: no padding, no position
    ids, no fused head, no chunks, none of the project's scoring code. ``[B, Lc]``, 0 off the mask."""
    P = b["prompt_length"]
    out = torch.zeros(b["completion_mask"].shape)
    for i in range(len(b["input_ids"])):
        prompt = b["input_ids"][i, :P][b["attention_mask"][i, :P].bool()]
        completion = b["input_ids"][i, P:][b["attention_mask"][i, P:].bool()]
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / b["temperature"]
        logp = logits[len(prompt) - 1: -1].log_softmax(-1).gather(-1, completion[:, None])[:, 0]
        out[i, : len(completion)] = logp
    return out * b["completion_mask"]


@pytest.mark.slow
def test_kl_reference_is_the_starting_checkpoint_and_kl_leaves_zero(tiny_model_dir, tmp_path):
    """2 rollouts x 2 passes x 2 minibatches with beta > 0. Every step's ``ref_logprobs`` equal the
    log-probs of the starting checkpoint, loaded here on its own and run row by row; the policy
    moved away from it (the second rollout's old log-probs differ from its reference's), and
    ``loss/kl`` is 0 on the first step (policy = reference) and positive on the last ones."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    module = PolicyModule(tiny_model_dir, loss=ESPOLoss(beta=0.1), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    record = Record()
    trainer(tmp_path, 2, [record]).fit(module, datamodule=datamodule(ppo_epochs=2, temperature=0.9))
    assert len(record.batches) == 2 * 2 * 2

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for step, b in enumerate(record.batches):
        assert b["ref_logprobs"] is not None and b["completion_mask"].any()
        want = independent_logprobs(start, b)
        torch.testing.assert_close(b["ref_logprobs"] * b["completion_mask"], want, atol=2e-5, rtol=0,
                                   msg=lambda m: f"step {step}: {m}")
    second = record.batches[4]  # the second rollout's first minibatch: sampled by the updated policy
    moved = (second["old_logprobs"] - second["ref_logprobs"]).abs()[second["completion_mask"]].max()
    assert moved > 1e-2, moved
    assert abs(record.kl[0]) < 1e-6, record.kl
    assert min(record.kl[-4:]) > 1e-5, record.kl


SCHEDULE = dict(start_factor=1.0, end_factor=0.1, total_iters=10)
LR = 1e-3


def linear_lr(steps: int) -> float:
    """``LinearLR(start_factor=1, end_factor=0.1, total_iters=10)`` after ``steps`` scheduler steps:
    the factor falls linearly from 1 to 0.1 over 10 steps, ``1 - 0.9 * min(steps, 10) / 10``."""
    return LR * (1 - 0.9 * min(steps, 10) / 10)


def scheduled_module(model_dir: str) -> PolicyModule:
    return PolicyModule(model_dir, loss=GRPOLoss(), optimizer=lambda p: torch.optim.AdamW(p, lr=LR),
                        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, **SCHEDULE))


@pytest.mark.slow
def test_lr_scheduler_steps_once_per_optimizer_step_and_survives_a_resume(tiny_model_dir, tmp_path):
    """2 rollouts of 2 minibatches: the lr seen after optimizer step k is the formula at k; a run
    resumed from the end-of-rollout checkpoint continues the schedule at step 4, not at step 0."""
    record = Record()
    checkpoint = RolloutCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer(tmp_path, 2, [record, checkpoint]).fit(scheduled_module(tiny_model_dir), datamodule=datamodule())
    assert record.lrs == pytest.approx([linear_lr(k) for k in range(1, 5)], rel=1e-12)

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4

    resumed = Record()
    trainer(tmp_path, 3, [resumed]).fit(scheduled_module(tiny_model_dir), datamodule=datamodule(),
                                        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.lrs == pytest.approx([linear_lr(k) for k in (5, 6)], rel=1e-12)


class _Serve(L.LightningDataModule):
    def __init__(self, *batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        from espo_lightning.rollout.batch import ServedBatch
        from espo_lightning.rollout.loaders import Items

        return DataLoader(Items([ServedBatch(b) for b in self.batches]), batch_size=None)


def test_no_optimizer_step_on_a_minibatch_without_a_valid_token(tiny_model_dir, tmp_path):
    """A real step, then a minibatch whose every token is masked: its gradient is zero, but AdamW
    would still move every weight on its momentum. The weights after it are those after the first
    step, bit for bit, and neither the optimizer nor the scheduler counted a step."""
    module = scheduled_module(tiny_model_dir)
    module.configure_model()
    rollout = module.score_rollout(toy_rollout(tiny_model_dir))
    real, empty = rollout.select(torch.arange(8)).trimmed(), rollout.select(torch.arange(8, 16)).trimmed()
    empty.completion_mask = torch.zeros_like(empty.completion_mask)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})

    fit = trainer(tmp_path, 1, [Snapshot()])
    fit.fit(module, datamodule=_Serve(real, empty))
    assert len(snapshots) == 2
    for name, value in snapshots[0].items():
        assert torch.equal(snapshots[1][name], value), name
    state = fit.optimizers[0].state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {1}
    assert fit.lr_scheduler_configs[0].scheduler.last_epoch == 1


def test_accumulate_grad_batches_is_refused_with_the_key(tiny_model_dir, tmp_path):
    module = PolicyModule(tiny_model_dir, loss=GRPOLoss())
    with pytest.raises(ConfigError, match=r"trainer\.accumulate_grad_batches.*micro_batch_size"):
        trainer(tmp_path, 1, accumulate_grad_batches=2).fit(module, datamodule=datamodule())


class _Metric(L.Callback):
    """Writes ``score`` = ``values[epoch]`` at the end of each epoch, before the checkpoint reads it."""

    def __init__(self, values):
        self.values = values

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.callback_metrics["score"] = torch.tensor(self.values[trainer.current_epoch])


@pytest.mark.parametrize("mode, values, best_epoch", [("max", [0.3, 0.7, 0.5, float("nan")], 1),
                                                      ("min", [0.3, 0.7, 0.1, 0.2], 2)])
def test_best_checkpoint_is_the_epoch_with_the_best_monitored_value(tmp_path, mode, values, best_epoch):
    from lightning.pytorch.demos.boring_classes import BoringModel

    checkpoint = RolloutCheckpoint(dirpath=str(tmp_path), monitor="score", mode=mode)
    fit = L.Trainer(accelerator="cpu", max_epochs=len(values), limit_train_batches=1, limit_val_batches=0,
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[_Metric(values), checkpoint], default_root_dir=str(tmp_path))
    fit.fit(BoringModel())
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert best["epoch"] == best_epoch and best["global_step"] == best_epoch + 1
    assert checkpoint.best_score == pytest.approx(values[best_epoch])
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == len(values)
    saved = next(v for k, v in last["callbacks"].items() if "RolloutCheckpoint" in k)
    assert saved == {"best_score": pytest.approx(values[best_epoch]), "monitor": "score"}
