"""The first update of a rollout scores its own minibatch (``score_rollout(defer_first=True)``).

That update is on-policy: the forward pass it makes for the loss computes exactly the log-probs and
entropies the scoring pass would, so the scoring pass skips those rows and ``training_step`` fills
them in. Checked here against scoring everything up front, on a real tiny model: the same old
log-probs, entropies and entropy groups (bit for bit), the same step metrics and the same weights
after two steps, on the fused head and the logits path, with and without micro-batches."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from espo_lightning.losses import ESPOLoss, GRPOLoss
from rollout_toys import toy_rollout

pytestmark = pytest.mark.slow  # ten Trainer fits on the tiny model


class _Serve(L.LightningDataModule):
    """Serves one minibatch twice: the first step is on-policy, the second is not."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        from espo_lightning.rollout.batch import ServedBatch
        from espo_lightning.rollout.loaders import Items

        served = ServedBatch(self.batch)
        return DataLoader(Items([served, served]), batch_size=None)


class _Steps(L.Callback):
    def __init__(self):
        self.metrics, self.batches = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in outputs["metrics"].items()})
        b = outputs["batch"]
        keys = ("old_logprobs", "entropies", "group_ids", "ref_logprobs")
        self.batches.append({k: getattr(b, k).clone() for k in keys if getattr(b, k) is not None})


def _run(model_dir: str, loss, defer: bool, **module_kwargs):
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(model_dir, loss=loss, optimizer=lambda p: torch.optim.SGD(p, lr=5.0), **module_kwargs)
    module.configure_model()
    rollout = toy_rollout(model_dir)
    first, second = torch.tensor([0, 5, 6, 9, 10, 15, 2, 12]), torch.tensor([1, 3, 4, 7, 8, 11, 13, 14])
    rollout = module.score_rollout(rollout, [first, second], defer_first=defer)
    minibatch = rollout.select(first).trimmed()
    assert (minibatch.unscored is not None) == defer
    if defer:
        assert float(minibatch.old_logprobs.abs().sum()) == 0.0  # really left to the update
        assert not bool(rollout.select(second).unscored.any())
        assert float(rollout.select(second).old_logprobs.abs().sum()) > 0.0
    steps = _Steps()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[steps],
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_Serve(minibatch))
    assert trainer.global_step == 2
    weights = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    return weights, steps, rollout.select(second)


@pytest.mark.parametrize("loss_name, module_kwargs", [
    ("espo", {}),
    ("espo", {"micro_batch_size": 3}),
    ("espo", {"fused_lm_head": False, "max_tokens_per_micro_batch": 30}),
    ("grpo", {}),
    ("espo_kl", {"micro_batch_size": 5}),  # the reference is still scored up front for every row
])
def test_first_update_scoring_itself_equals_scoring_up_front(tiny_model_dir, loss_name, module_kwargs):
    make = {"espo": lambda: ESPOLoss(), "grpo": lambda: GRPOLoss(), "espo_kl": lambda: ESPOLoss(beta=0.05)}[loss_name]
    w_ref, ref, rest_ref = _run(tiny_model_dir, make(), defer=False, **module_kwargs)
    w_def, got, rest_def = _run(tiny_model_dir, make(), defer=True, **module_kwargs)
    assert ref.metrics[0]["ratio/max"] == 1.0 and got.metrics[0]["ratio/max"] == 1.0  # on-policy, bit-exact
    assert ref.metrics[1]["ratio/max"] != 1.0  # the second step is a real off-policy update
    for step in (0, 1):
        assert got.metrics[step] == ref.metrics[step], step
        for key, want in ref.batches[step].items():
            assert torch.equal(got.batches[step][key], want), (step, key)
    assert ref.batches[0]["entropies"].abs().sum() > 0
    for name, want in w_ref.items():
        assert torch.equal(w_def[name], want), name
    for key in ("old_logprobs", "entropies"):  # the other minibatch is scored up front either way
        assert torch.equal(getattr(rest_def, key), getattr(rest_ref, key))


def test_batch_scoped_grouping_is_never_deferred(tiny_model_dir):
    """ESPO with ``scope: batch`` ranks entropies over the whole rollout: its rows cannot be
    prepared one minibatch at a time, so everything is scored up front."""
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(tiny_model_dir, loss=ESPOLoss(scope="batch"))
    module.configure_model()
    rollout = module.score_rollout(toy_rollout(tiny_model_dir), [torch.arange(8), torch.arange(8, 16)], defer_first=True)
    assert rollout.unscored is None and bool((rollout.old_logprobs != 0).any(-1).all())


def test_a_minibatch_mixing_scored_and_unscored_rows_is_refused(tiny_model_dir):
    from espo_lightning.training.old_policy import is_unscored
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(tiny_model_dir, loss=ESPOLoss())
    module.configure_model()
    rollout = module.score_rollout(toy_rollout(tiny_model_dir), [torch.arange(8), torch.arange(8, 16)], defer_first=True)
    mixed = rollout.select(torch.arange(4, 12))
    with pytest.raises(RuntimeError, match="mixes rows scored"):
        is_unscored(mixed)
