"""With one on-policy minibatch per rollout the importance ratio must be exactly 1 and nothing may
clip: old-policy scoring runs under the training step's precision context, in train mode, with the
micro-batches the first training pass uses, and dropout disabled. Checked on real rollouts of the
tiny model under 32-true, bf16-mixed and bf16-true in one process, and under FSDP2 on 2 ranks.

Each rollout here is one minibatch (``data.minibatch_size`` unset) cut into micro-batches of 3
responses. With ``ppo_epochs: 2`` the rollout is scored up front and each rollout's first step is
the first pass over freshly scored rows; with one pass the first update scores its rows itself
(``tests/test_deferred_scoring.py``), and the ratio must be 1 all the same."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class _Ratios(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = outputs["metrics"]
        self.steps.append({"ratio_max": float(m["ratio/max"]), "ratio_mean": float(m["ratio/mean"]),
                           "clip_total": float(m["clip/total"]), "tokens": float(m["count/tokens"])})


def _fit(model_dir: str, precision: str, epochs: int = 2, strategy=None, devices: int = 1, ppo_epochs: int = 2,
         **module_kwargs):
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rewards import exact_match
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.tasks.addition import AdditionSource

    module = PolicyModule(model_dir, loss=ESPOLoss(), micro_batch_size=3,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **module_kwargs)
    dm = RolloutDataModule(train_data=AdditionSource(num_problems=40, seed=5), reward_funcs=[exact_match],
                           prompts_per_rollout=4, num_generations=4, max_new_tokens=4, ppo_epochs=ppo_epochs)
    ratios = _Ratios()
    kwargs = {"strategy": strategy} if strategy is not None else {}
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_epochs=epochs, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1, callbacks=[ratios], **kwargs)
    trainer.fit(module, datamodule=dm)
    assert len(ratios.steps) == epochs * ppo_epochs
    return trainer, ratios.steps[::ppo_epochs]  # the first step of each rollout: on-policy


def _assert_on_policy(steps, epochs: int = 2):
    assert len(steps) == epochs and all(s["tokens"] > 0 for s in steps)
    for s in steps:
        assert abs(s["ratio_max"] - 1) < 1e-5 and abs(s["ratio_mean"] - 1) < 1e-5, s
        assert s["clip_total"] == 0.0, s


@pytest.mark.slow
@pytest.mark.parametrize("precision, ppo_epochs", [("32-true", 2), ("bf16-mixed", 2), ("bf16-true", 2),
                                                   ("bf16-mixed", 1)])
def test_first_pass_ratio_is_exactly_one(tiny_model_dir, precision, ppo_epochs):
    _, steps = _fit(tiny_model_dir, precision, ppo_epochs=ppo_epochs)
    _assert_on_policy(steps)
    assert all(s["ratio_max"] == 1.0 for s in steps), steps  # bit-identical, not just close


@pytest.mark.slow
def test_dropout_is_disabled_so_scoring_and_training_agree(tiny_model_dir, tmp_path):
    """A checkpoint with attention dropout 0.5: disabled (the default), the ratio is 1; kept, the
    scoring pass and the training pass drop different attention weights and the ratio is not 1."""
    model_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    _, steps = _fit(str(model_dir), "32-true")
    _assert_on_policy(steps)
    _, steps = _fit(str(model_dir), "32-true", disable_dropout=False)
    assert max(abs(s["ratio_max"] - 1) for s in steps) > 1e-3


def worker(model_dir: str, out: str) -> None:
    """FSDP2 on 2 ranks (gloo), bf16-mixed: every rank writes its steps' ratios."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from espo_lightning.run.distributed import shutdown

    for ppo_epochs in (2, 1):  # scored up front; scored by the first update (with padding passes)
        trainer, steps = _fit(model_dir, "bf16-mixed", devices=2, ppo_epochs=ppo_epochs,
                              strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                              max_tokens_per_micro_batch=24)  # ranks cut different numbers of micro-batches
        Path(out, f"rank{trainer.global_rank}-{ppo_epochs}.json").write_text(json.dumps(steps))
    shutdown()


@pytest.mark.slow
@pytest.mark.distributed
def test_first_pass_ratio_is_one_under_fsdp2_bf16(tiny_model_dir, tmp_path):
    from test_distributed_parity import _clean_env

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), tiny_model_dir, str(tmp_path)], cwd=REPO,
                          env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in (0, 1):
        for ppo_epochs in (2, 1):
            _assert_on_policy(json.loads((tmp_path / f"rank{rank}-{ppo_epochs}.json").read_text()))


if __name__ == "__main__":
    worker(*sys.argv[1:3])
