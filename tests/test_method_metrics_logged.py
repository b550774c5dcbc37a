"""ClipFractionMonitor logs what the entropy-aware baselines report beside the clip fractions
(``cov/selected``, ``entropy_mask/kept``, ``gate/weight_mean``), per step and token-weighted per
epoch, and only when the loss reports them."""
from __future__ import annotations

import pytest
import torch

from callback_toys import ToyModule, cat_batches, epoch_batches, fit
from callbacks import ClipFractionMonitor


def kept(b) -> torch.Tensor:
    """A mask's kept fraction, written out: valid tokens whose entropy is above 1 nat."""
    mask = b.completion_mask
    return ((b.entropies > 1.0) & mask).sum() / mask.sum().clamp_min(1)


class MaskedToy(ToyModule):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["metrics"] = {**out["metrics"], "entropy_mask/kept": kept(batch)}
        return out


def test_entropy_mask_kept_fraction_is_logged_per_step_and_token_weighted_per_epoch():
    trainer, module, logger = fit([ClipFractionMonitor()], module=MaskedToy())
    assert logger.series("entropy_mask/kept") == pytest.approx([kept(b).item() for b in module.seen], rel=1e-5)
    for epoch in (0, 1):
        assert logger.series("entropy_mask/kept_epoch")[epoch] == pytest.approx(
            kept(cat_batches(epoch_batches(epoch))).item(), rel=1e-5)
    assert not logger.series("cov/selected")  # not reported by this loss: not logged

