"""Memory at the real vocabulary size (V = 151,936), checked by what the code controls: the tensors
one training step saves for its backward (``torch.autograd.graph.saved_tensors_hooks``).

A minibatch of 16 responses of 256 tokens in micro-batches of 8: one micro-batch's fp32 logits
would be 8 x 256 x 151,936 x 4 B = 1.16 GiB, and the logits path saves exactly such a tensor for
its backward. The fused LM head (``espo_lightning.policy.lm_head``) saves the final hidden states, the
head's weight and the targets instead, so nothing of size [B, T, V] is ever kept. This replaces a
512-token decode of 128 rows whose peak RSS was compared with 4 GiB (minutes, and the machine's
allocator decided the number); the saved bytes are the same on every machine."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

V, ROWS, PROMPT, COMPLETION, MICRO = 151_936, 16, 4, 256, 8
LOGITS_BYTES = MICRO * COMPLETION * V * 4  # one micro-batch's [B, T, V] fp32 logits


class _Serve(L.LightningDataModule):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        from espo_lightning.rollout.batch import ServedBatch
        from espo_lightning.rollout.loaders import Items

        return DataLoader(Items([ServedBatch(self.batch)]), batch_size=None)


def _saved_by_one_step(model_dir: str, **module_kwargs) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every tensor saved for backward during one real training step."""
    from espo_lightning.rollout.advantages import group_advantages
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rollout.tensors import build_rollout_batch

    module = PolicyModule(model_dir, loss=ESPOLoss(), micro_batch_size=MICRO, **module_kwargs)
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [[int(x) for x in torch.randint(3, 10, (PROMPT,), generator=gen)] for _ in range(ROWS)]
    completions = [[int(x) for x in torch.randint(3, V, (COMPLETION,), generator=gen)] for _ in range(ROWS)]
    rewards = torch.arange(ROWS, dtype=torch.float32) % 2  # every group of 4 has variance
    batch = build_rollout_batch(prompts, completions, 0, group_advantages(rewards, 4), rewards, None, 1.0)
    batch = module.score_rollout(batch)
    saved = []

    def pack(t: torch.Tensor):
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.fit(module, datamodule=_Serve(batch))
    assert trainer.global_step == 1
    return saved


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory) -> str:
    from espo_lightning.tasks.wide_vocab import build_wide_vocab_model

    return str(build_wide_vocab_model(tmp_path_factory.mktemp("models") / "wide-vocab", vocab_size=V))


@pytest.mark.slow
def test_a_training_step_at_qwen_vocabulary_saves_no_logits(wide_vocab_dir):
    saved = _saved_by_one_step(wide_vocab_dir)
    largest_shape, largest = max(saved, key=lambda s: s[1])
    # no tensor with a [*, T, V] or [B * T, V] shape, and all of them together far below one
    # micro-batch's logits (the head's [V, H] weight, 9.7 MiB, is the largest thing kept)
    assert not [s for s, _ in saved if len(s) >= 2 and s[-1] == V and s[0] != V], largest_shape
    assert largest <= V * 16 * 4, (largest_shape, largest)
    assert sum(b for _, b in saved) < LOGITS_BYTES / 16, sum(b for _, b in saved) / 2**20
