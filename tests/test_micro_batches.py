"""Micro-batches with exact normalisation: the plan, the losses' ``Normalizer``, and a real training
step that gives the same update with and without micro-batches."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from espo_lightning.losses import CISPOLoss, ESPOLoss, GMPOLoss, GRPOLoss, GSPOLoss
from espo_lightning.losses.base import Normalizer
from espo_lightning.training.micro_batches import is_every_row, is_one_pass, plan_micro_batches


# ----- the plan --------------------------------------------------------------------------------
def test_plan_without_limits_is_one_pass_in_row_order():
    plan = plan_micro_batches(torch.tensor([3, 1, 2]), torch.tensor([5, 9, 1]), None, None)
    assert [p.tolist() for p in plan] == [[0, 1, 2]]
    assert is_every_row(plan[0], 3) and is_one_pass([(plan[0], False)], 3)


def test_every_row_needs_all_rows_in_their_own_order():
    """Scoring skips its copy of a minibatch only then (old_policy.score_rollout)."""
    assert not is_every_row(torch.tensor([1, 0, 2]), 3)
    assert not is_every_row(torch.tensor([0, 1]), 3)
    assert not is_one_pass([(torch.arange(3), True)], 3)  # a padding pass


def test_plan_by_count_sorts_longest_first():
    # total lengths 8, 10, 3, 7, 5 -> order 1, 0, 3, 4, 2
    plan = plan_micro_batches(torch.tensor([3, 1, 2, 2, 1]), torch.tensor([5, 9, 1, 5, 4]), 2, None)
    assert [p.tolist() for p in plan] == [[1, 0], [3, 4], [2]]


def test_plan_by_token_budget_counts_padded_width():
    """Width of a micro-batch = longest prompt + longest completion (left/right padding). Rows in
    order 1 (p1, c9), 0 (p3, c5), 3 (p2, c5), 4 (p1, c4), 2 (p2, c1); budget 24:
    [1] width 10; + row 0 -> width 3 + 9 = 12, 2 x 12 = 24 fits; + row 3 -> 3 x 12 = 36 > 24: close.
    [3] width 7; + row 4 -> 2 x 7 = 14; + row 2 -> 3 x 7 = 21 fits."""
    plan = plan_micro_batches(torch.tensor([3, 1, 2, 2, 1]), torch.tensor([5, 9, 1, 5, 4]), None, 24)
    assert [p.tolist() for p in plan] == [[1, 0], [3, 4, 2]]
    # both limits: the count closes the second micro-batch first
    plan = plan_micro_batches(torch.tensor([3, 1, 2, 2, 1]), torch.tensor([5, 9, 1, 5, 4]), 2, 24)
    assert [p.tolist() for p in plan] == [[1, 0], [3, 4], [2]]


def test_a_row_over_the_budget_gets_its_own_micro_batch():
    plan = plan_micro_batches(torch.tensor([2, 2, 2]), torch.tensor([50, 1, 1]), None, 10)
    assert [p.tolist() for p in plan] == [[0], [1, 2]]
    assert sorted(torch.cat(plan).tolist()) == [0, 1, 2]


# ----- the losses: micro-batch losses with the minibatch's counts add up to the minibatch's loss -----
B, T = 9, 7
LOSSES = {
    "espo": lambda: ESPOLoss(vocab_size=151_936),
    "espo_quantile_kl": lambda: ESPOLoss(vocab_size=151_936, grouping="quantile", num_groups=3, beta=0.1),
    "grpo": lambda: GRPOLoss(),
    "dapo": lambda: GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean", beta=0.05),
    "gspo": lambda: GSPOLoss(),
    "cispo": lambda: CISPOLoss(epsilon_low=0.1, epsilon_high=0.05),
    "gmpo": lambda: GMPOLoss(epsilon_low=0.02, epsilon_high=0.02),
}


def _inputs(per_token_advantages: bool = False):
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 1, 4, 0, 6, 2, 7, 3, 5])  # unequal, one empty response
    mask = torch.arange(T) < lengths.unsqueeze(1)  # [B, T]
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # some ratios clip
    adv = torch.randn(B, T if per_token_advantages else 1, generator=gen, dtype=torch.float64).squeeze(-1)
    ent = 4 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent, ref_logprobs=ref)


def _full_and_micro(loss_fn, inputs, plan):
    group_ids = loss_fn.prepare(inputs["entropies"], inputs["mask"])  # once per rollout, as the trainer does
    full_logp = inputs["logprobs"].clone().requires_grad_(True)
    full, _ = loss_fn(**{**inputs, "logprobs": full_logp}, group_ids=group_ids)
    (full_grad,) = torch.autograd.grad(full, full_logp)

    leaf = inputs["logprobs"].clone().requires_grad_(True)
    counts = Normalizer.of(inputs["mask"])
    total = 0.0
    for rows in plan:
        width = max(1, int(inputs["mask"][rows].sum(-1).max()))  # trimmed to the micro-batch's longest
        part = {k: (v[rows] if v.dim() == 1 else v[rows, :width]) for k, v in inputs.items()}
        part["logprobs"] = leaf[rows, :width]
        loss, _ = loss_fn(**part, group_ids=group_ids[rows, :width] if group_ids is not None else None,
                          normalizer=counts)
        loss.backward()
        total = total + loss.detach()
    return full.detach(), full_grad, total, leaf.grad


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("limits", [(2, None), (None, 12), (4, 20)])
def test_micro_batch_losses_and_gradients_equal_one_pass(name, limits):
    loss_fn = LOSSES[name]()
    inputs = _inputs()
    lengths = inputs["mask"].sum(-1)
    plan = plan_micro_batches(torch.ones(B, dtype=torch.long), lengths, *limits)
    assert len(plan) > 1
    full, full_grad, total, grad = _full_and_micro(loss_fn, inputs, plan)
    assert abs(float(full)) > 1e-3 and float(full_grad.abs().max()) > 1e-3  # a real signal
    # float64: the sums differ from one pass by round-off only (~1e-16 relative), as the other loss
    # tests hold; 1e-6 would let a normalizer off by one part in a million through
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_metrics_describe_the_rows_given_whatever_the_normalizer(name):
    """``training_step`` reuses a single pass's metrics for the minibatch instead of computing them
    again without grad: that is exact only if the normalizer and grad mode leave them unchanged."""
    loss_fn = LOSSES[name]()
    inputs = _inputs()
    group_ids = loss_fn.prepare(inputs["entropies"], inputs["mask"])
    leaf = inputs["logprobs"].clone().requires_grad_(True)
    counts = Normalizer(torch.tensor(40.0), torch.tensor(321.0))  # as if other micro-batches and ranks existed
    _, with_grad = loss_fn(**{**inputs, "logprobs": leaf}, group_ids=group_ids, normalizer=counts)
    with torch.no_grad():
        _, plain = loss_fn(**inputs, group_ids=group_ids)
    assert with_grad.keys() == plain.keys() and len(plain) >= 9
    for key, value in plain.items():
        assert not with_grad[key].requires_grad and torch.equal(with_grad[key], value), key


@pytest.mark.parametrize("name", ["espo", "grpo", "gspo"])
def test_per_token_advantages_too(name):
    loss_fn = LOSSES[name]()
    inputs = _inputs(per_token_advantages=True)
    plan = plan_micro_batches(torch.ones(B, dtype=torch.long), inputs["mask"].sum(-1), 3, None)
    full, full_grad, total, grad = _full_and_micro(loss_fn, inputs, plan)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)


def test_rank_shares_with_global_counts_add_up_for_token_means():
    """Two "ranks" holding 13 and 22 valid tokens: with the global counts each rank's loss is its share
    of the full token mean, so their sum (what averaged gradients x world size descend) is the full
    DAPO / CISPO loss. Each rank's own token mean, averaged, is not (TRL's and verl's approximation)."""
    inputs = _inputs()
    ranks = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])]
    assert [int(inputs["mask"][r].sum()) for r in ranks] == [12, 23]
    for loss_fn in (LOSSES["dapo"](), LOSSES["cispo"]()):
        full, _, total, _ = _full_and_micro(loss_fn, inputs, ranks)
        torch.testing.assert_close(total, full, atol=1e-12, rtol=0)
        own = [loss_fn(**{k: v[r] for k, v in inputs.items()})[0] for r in ranks]
        assert abs(float(sum(own) / 2 - full)) > 1e-3


# ----- a real training step: micro-batched or not, the same update ------------------------------
class _Fixed(L.LightningDataModule):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        from espo_lightning.rollout.loaders import Items

        return DataLoader(Items([self.batch, self.batch]), batch_size=None)


class _Outputs(L.Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in outputs["metrics"].items()})


def _scored_batch(model_dir: str):
    """Responses of 1 to 5 tokens under prompts of 4 to 6 tokens, old log-probs perturbed so that
    ESPO clips part of the batch."""
    from espo_lightning.training.module import PolicyModule
    from rollout_toys import toy_rollout

    module = PolicyModule(model_dir, loss=ESPOLoss())
    module.configure_model()
    batch = module.score_rollout(toy_rollout(model_dir))
    gen = torch.Generator().manual_seed(2)
    batch.old_logprobs = batch.old_logprobs + 0.05 * torch.randn(batch.old_logprobs.shape, generator=gen)
    return batch


def _train(model_dir, batch, **module_kwargs):
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(model_dir, loss=ESPOLoss(), optimizer=lambda p: torch.optim.SGD(p, lr=20.0), **module_kwargs)
    outputs = _Outputs()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[outputs],
                        gradient_clip_val=1e-3)
    trainer.fit(module, datamodule=_Fixed(batch))
    assert trainer.global_step == 2
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, outputs.metrics


def test_training_step_with_micro_batches_equals_one_pass(tiny_model_dir):
    """Two SGD steps on the same minibatch (the second clipped by trainer.gradient_clip_val, which
    the module applies under manual optimization): fixed-size and token-budget micro-batches give the
    weights and the step metrics of one pass over the minibatch."""
    from transformers import AutoModelForCausalLM

    batch = _scored_batch(tiny_model_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    one, one_metrics = _train(tiny_model_dir, batch)
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3  # the steps are real
    assert one_metrics[0]["clip/total"] > 0 and one_metrics[0]["count/sequences"] == 16
    for kwargs in ({"micro_batch_size": 3}, {"max_tokens_per_micro_batch": 20}, {"fused_lm_head": False}):
        weights, metrics = _train(tiny_model_dir, batch, **kwargs)
        assert max(float((weights[k] - one[k]).abs().max()) for k in one) < 1e-6, kwargs
        for got, want in zip(metrics, one_metrics):
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-6 for k in want), kwargs


def test_clipping_with_the_shared_norm_equals_lightnings_clipping(tiny_model_dir, monkeypatch):
    """The module clips by the gradient norm it computed once for the step (and that
    GradientUtilizationMonitor logs); Lightning's own ``clip_gradients`` computes it again. Both
    must give the same weights, bit for bit, with a clip value that really clips."""
    import espo_lightning.training.grad_norm as module_file

    batch = _scored_batch(tiny_model_dir)
    shared, _ = _train(tiny_model_dir, batch)
    monkeypatch.setattr(module_file, "can_clip_with_norm", lambda trainer, params: False)
    lightning, _ = _train(tiny_model_dir, batch)
    for name, value in lightning.items():
        assert torch.equal(shared[name], value), name


def test_shared_norm_is_refused_where_lightning_clips_otherwise():
    from espo_lightning.training.grad_norm import can_clip_with_norm

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    assert can_clip_with_norm(L.Trainer(gradient_clip_val=1.0, logger=False), [p])
    assert not can_clip_with_norm(L.Trainer(gradient_clip_val=1.0, gradient_clip_algorithm="value", logger=False), [p])
    from lightning.pytorch.plugins.precision import Precision

    class OwnClipping(Precision):  # as precision plugins that clip sharded gradients their own way
        def clip_grad_by_norm(self, optimizer, clip_val):
            raise AssertionError

    assert not can_clip_with_norm(L.Trainer(gradient_clip_val=1.0, plugins=[OwnClipping()], logger=False), [p])
