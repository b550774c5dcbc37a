"""Property tests (hypothesis): on any batch, every loss is finite, its gradient is finite and zero
off-mask, every metric is a finite detached scalar and every fraction metric lies in [0, 1]."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_lightning.rollout.advantages import group_advantages
from espo_lightning.losses import CISPOLoss, ESPOLoss, GMPOLoss, GRPOLoss, GSPOLoss
from grouping_reference import reference_groups

LOSSES = [
    lambda: ESPOLoss(vocab_size=64),
    lambda: ESPOLoss(grouping="quantile", num_groups=3, vocab_size=64, epsilon_min=1e-3, epsilon_max=0.2),
    lambda: ESPOLoss(grouping="threshold", thresholds=[0.5, 2.0], vocab_size=64),
    lambda: ESPOLoss(grouping="token", adaptive_clip=False, epsilon_low=0.2, epsilon_high=0.28),
    lambda: ESPOLoss(grouping="sequence", vocab_size=64, beta=0.1),
    lambda: ESPOLoss(scope="batch", vocab_size=64),
    lambda: GSPOLoss(beta=0.05, kl_estimator="k2"),
    lambda: GRPOLoss(),
    lambda: GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean", beta=0.1, kl_estimator="k3"),
    lambda: CISPOLoss(),
    lambda: GMPOLoss(beta=0.1, kl_estimator="k1"),
]

FLOATS = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False, width=32)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    cells = B * T

    def grid(elements):
        return torch.tensor(draw(st.lists(elements, min_size=cells, max_size=cells)), dtype=dtype).view(B, T)

    logp = grid(FLOATS)
    old = grid(FLOATS)
    ref = grid(FLOATS)
    ent = grid(st.floats(0.0, 12.0, width=32))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=cells, max_size=cells))).view(B, T)
    adv_values = st.one_of(st.just(0.0), st.floats(-5.0, 5.0, width=32))
    if draw(st.booleans()):
        adv = torch.tensor(draw(st.lists(adv_values, min_size=B, max_size=B)), dtype=dtype)
    else:
        adv = grid(adv_values)
    return dict(logprobs=logp.requires_grad_(), old_logprobs=old, advantages=adv, mask=mask, entropies=ent,
                ref_logprobs=ref)


def is_fraction(key):
    return key.startswith(("clip/", "grad_util/")) or key.endswith(("size_frac", "clip_frac"))


@settings(max_examples=40, deadline=None)
@given(batch=batches(), which=st.integers(0, len(LOSSES) - 1))
def test_losses_are_finite_with_fraction_metrics_in_unit_interval(batch, which):
    loss_fn = LOSSES[which]()
    loss, metrics = loss_fn(**batch)
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert (grad[~batch["mask"]] == 0).all()
    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
        if is_fraction(key):
            assert 0.0 <= value.item() <= 1.0, (key, value)
    assert metrics["count/tokens"].item() == batch["mask"].sum().item()


@settings(max_examples=40, deadline=None)
@given(batch=batches(), rho=st.sampled_from([0.1, 0.2, 0.5, 1.0]))
def test_espo_groups_as_the_loop_reference(batch, rho):
    """On any batch (ties included) ``prepare`` gives the loop reference's top-fraction groups, and
    ``forward``'s own grouping the same loss and metrics as the reference's groups."""
    loss_fn = ESPOLoss(vocab_size=64, high_entropy_fraction=rho)
    want = reference_groups(batch["entropies"], batch["mask"], high_entropy_fraction=rho)
    assert torch.equal(loss_fn.prepare(batch["entropies"], batch["mask"]), want)
    loss_a, metrics_a = loss_fn(**batch)
    loss_b, metrics_b = loss_fn(**batch, group_ids=want)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(st.one_of(st.none(), st.floats(-1e3, 1e3)), min_size=1, max_size=24),
    group_size=st.integers(1, 6),
)
def test_group_advantages_never_nan(rewards, group_size):
    rewards = rewards[: len(rewards) - len(rewards) % group_size] or [None] * group_size
    tensor = torch.tensor([float("nan") if r is None else r for r in rewards], dtype=torch.float64)
    adv = group_advantages(tensor, group_size)
    assert torch.isfinite(adv).all()
    assert (adv[torch.isnan(tensor)] == 0).all()
    # every group's scored advantages sum to 0 (they are centred)
    sums = torch.where(torch.isnan(tensor), 0.0, adv).view(-1, group_size).sum(-1)
    assert (sums.abs() < 1e-6).all()
