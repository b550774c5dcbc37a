"""Dynamic sampling through the real CLI: every optimizer step gets a full minibatch, the rounds and
dropped groups are logged, and the policy still learns."""
from __future__ import annotations

import lightning as L
import pytest

from test_fit_e2e import run, scalars, tiny_args

pytestmark = pytest.mark.slow

SIZES: list[int] = []


class MinibatchSizes(L.Callback):
    """Records the number of responses of every training step's minibatch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from espo_lightning.rollout.batch import unwrap

        SIZES.append(len(unwrap(batch)))


def test_dynamic_sampling_keeps_minibatches_full_and_learns(tiny_model_dir, tmp_path):
    SIZES.clear()
    root = tmp_path / "run"
    args = tiny_args(tiny_model_dir, root, epochs=12)
    args += ["--data.drop_zero_std_groups", "true", "--data.max_sampling_rounds", "8", "--data.ppo_epochs", "1",
             "--data.prompts_per_rollout", "8", "--data.minibatch_size", "16",
             "--trainer.check_val_every_n_epoch", "100", "--model.optimizer.init_args.lr", "3e-3",
             "--trainer.callbacks+=test_dynamic_sampling_e2e.MinibatchSizes"]
    run(["fit"] + args)
    tags = scalars(root / "lightning_logs" / "version_0")
    assert SIZES == [16] * (12 * 2), SIZES  # 12 epochs x 2 minibatches of 16 responses, never fewer
    rounds = [v for _, v in tags["rollout/sampling_rounds"]]
    dropped = [v for _, v in tags["rollout/dropped_group_frac"]]
    assert len(rounds) == len(dropped) == 12 and all(1 <= r <= 8 for r in rounds)
    assert max(rounds) > 1, "the test needs refill rounds"
    # the first-digit reward is learnt: its mean over every generated response rises
    reward = [v for _, v in tags["reward/mean"]]
    assert sum(reward[-4:]) / 4 > sum(reward[:2]) / 2 + 0.25, reward
