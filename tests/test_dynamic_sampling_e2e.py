"""Dynamic sampling through the real CLI: every optimizer step gets a full minibatch, and the rounds
and dropped groups logged are the ones a reward with exactly one varied group per round implies
(counts the code controls, not a learning curve the machine decides)."""
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


def test_dynamic_sampling_keeps_minibatches_full_and_logs_its_rounds(tiny_model_dir, tmp_path):
    SIZES.clear()
    root = tmp_path / "run"
    args = tiny_args(tiny_model_dir, root, epochs=3)
    args += ["--data.drop_zero_std_groups", "true", "--data.max_sampling_rounds", "10", "--data.ppo_epochs", "1",
             "--data.prompts_per_rollout", "8", "--data.minibatch_size", "16",
             "--data.reward_funcs", "[rollout_toys.first_group_varies]",
             "--trainer.check_val_every_n_epoch", "100", "--trainer.callbacks+=test_dynamic_sampling_e2e.MinibatchSizes"]
    run(["fit"] + args)
    tags = scalars(root / "lightning_logs" / "version_0")
    assert SIZES == [16] * (3 * 2), SIZES  # 3 epochs x 2 minibatches of 16 responses, never fewer
    # one varied group per round: 8 rounds fill the 8 prompts of a rollout; 8 x 8 groups generated,
    # 56 of them dropped
    assert [v for _, v in tags["rollout/sampling_rounds"]] == [8.0] * 3
    assert [v for _, v in tags["rollout/dropped_group_frac"]] == pytest.approx([56 / 64] * 3)
