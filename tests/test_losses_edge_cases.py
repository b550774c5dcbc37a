"""Edge cases every loss must survive: empty responses and batches, length-1 responses, huge
log-ratios, zero advantages, both dtypes, [B] vs [B, T] advantages, garbage in the padding, and
constructor validation."""
import math

import pytest
import torch

from espo_lightning.losses import CISPOLoss, ESPOLoss, GMPOLoss, GRPOLoss, GSPOLoss, PolicyLoss

LOSSES = {
    "espo": lambda: ESPOLoss(vocab_size=32),
    "espo_quantile": lambda: ESPOLoss(grouping="quantile", num_groups=3, vocab_size=32),
    "espo_token_fixed": lambda: ESPOLoss(grouping="token", adaptive_clip=False, vocab_size=32),
    "gspo": GSPOLoss,
    "grpo": GRPOLoss,
    "dapo": lambda: GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean"),
    "cispo": CISPOLoss,
    "gmpo": GMPOLoss,
}


def inputs(dtype=torch.float64, seed=0, B=4, T=6, spread=0.05):
    gen = torch.Generator().manual_seed(seed)
    old = (-torch.rand(B, T, generator=gen) * 3).to(dtype)
    logp = (old + spread * torch.randn(B, T, generator=gen).to(dtype)).requires_grad_()
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[:, 0] = True
    adv = torch.randn(B, generator=gen).to(dtype)
    ent = (torch.rand(B, T, generator=gen) * 3).to(dtype)
    return dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)


def run(loss_fn, kwargs):
    loss, metrics = loss_fn(**kwargs)
    (grad,) = torch.autograd.grad(loss, kwargs["logprobs"])
    assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(grad).all()
    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    return loss, grad, metrics


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_responses_do_not_count(name, dtype):
    """Adding all-False rows changes nothing: they are not responses of the minibatch."""
    kwargs = inputs(dtype)
    loss, grad, metrics = run(LOSSES[name](), kwargs)
    padded = {k: torch.cat([v.detach(), torch.zeros_like(v[:2].detach())]) for k, v in kwargs.items()}
    padded["logprobs"].requires_grad_()
    loss2, grad2, metrics2 = run(LOSSES[name](), padded)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss2, loss, **tol)
    torch.testing.assert_close(grad2[:4], grad, **tol)
    assert (grad2[4:] == 0).all()
    for key in metrics:
        torch.testing.assert_close(metrics2[key], metrics[key], **tol, msg=key)
    assert metrics2["count/sequences"].item() == 4


@pytest.mark.parametrize("name", LOSSES)
def test_batch_without_valid_tokens(name):
    kwargs = inputs()
    kwargs["mask"] = torch.zeros_like(kwargs["mask"])
    kwargs["logprobs"].data[0, 0] = math.nan  # padding may hold anything
    loss, grad, metrics = run(LOSSES[name](), kwargs)
    assert loss.item() == 0 and (grad == 0).all() and loss.requires_grad
    assert metrics["count/tokens"].item() == 0 and metrics["count/sequences"].item() == 0
    assert all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("name", LOSSES)
def test_length_one_responses(name):
    kwargs = inputs()
    kwargs["mask"] = torch.zeros_like(kwargs["mask"])
    kwargs["mask"][:, 2] = True
    _, grad, metrics = run(LOSSES[name](), kwargs)
    assert metrics["count/tokens"].item() == 4 and metrics["count/sequences"].item() == 4
    assert (grad[:, [0, 1, 3, 4, 5]] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_log_ratios_stay_finite(name, dtype):
    kwargs = inputs(dtype)
    d = torch.tensor([50.0, -50.0, 50.0, -50.0, 0.0, 1.0], dtype=dtype)
    kwargs["logprobs"] = (kwargs["old_logprobs"] + d).requires_grad_()
    kwargs["advantages"] = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=dtype)
    _, _, metrics = run(LOSSES[name](), kwargs)
    assert metrics["ratio/max"].item() <= math.exp(20) * (1 + 1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_zero_advantages_give_zero_loss_and_gradient(name):
    kwargs = inputs()
    kwargs["advantages"] = torch.zeros(4, dtype=torch.float64)
    loss, grad, metrics = run(LOSSES[name](), kwargs)
    assert loss.item() == 0 and (grad == 0).all()
    assert metrics["grad_util/token"].item() == 0 and metrics["grad_util/sequence"].item() == 0
    assert metrics["clip/total"].item() == 0


@pytest.mark.parametrize("name", LOSSES)
def test_per_token_advantages_equal_broadcast_ones(name):
    kwargs = inputs(spread=0.3)
    per_token = dict(kwargs, advantages=kwargs["advantages"].unsqueeze(-1).expand(4, 6).clone())
    per_token["advantages"][~kwargs["mask"]] = 99.0  # padding is ignored
    loss, grad, metrics = run(LOSSES[name](), kwargs)
    loss2, grad2, metrics2 = run(LOSSES[name](), per_token)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-14)
    for key in metrics:
        torch.testing.assert_close(metrics2[key], metrics[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("name", LOSSES)
def test_padding_garbage_is_ignored(name):
    kwargs = inputs()
    loss, grad, metrics = run(LOSSES[name](), kwargs)
    dirty = dict(kwargs)
    pad = ~kwargs["mask"]
    dirty["logprobs"] = kwargs["logprobs"].detach().masked_fill(pad, math.nan).requires_grad_()
    dirty["old_logprobs"] = kwargs["old_logprobs"].masked_fill(pad, -math.inf)
    dirty["entropies"] = kwargs["entropies"].masked_fill(pad, math.inf)
    loss2, grad2, metrics2 = run(LOSSES[name](), dirty)
    assert loss2.item() == loss.item()
    assert torch.equal(grad2, grad)
    assert all(torch.equal(metrics2[k], metrics[k]) for k in metrics)


@pytest.mark.parametrize("name", LOSSES)
def test_fraction_metrics_and_contract(name):
    loss_fn = LOSSES[name]()
    assert isinstance(loss_fn, PolicyLoss)
    assert loss_fn.needs_entropies == name.startswith("espo")
    assert (loss_fn.prepare(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)) is None) != name.startswith("espo")
    _, _, metrics = run(loss_fn, inputs(spread=0.5))
    for key in ("clip/low", "clip/high", "clip/total", "grad_util/token", "grad_util/sequence", "ratio/mean",
                "ratio/max", "count/tokens", "count/sequences"):
        assert key in metrics
    for key, value in metrics.items():
        if key.startswith(("clip/", "grad_util/")) or key.endswith(("size_frac", "clip_frac")):
            assert 0 <= value.item() <= 1, key


def test_shape_errors():
    kwargs = inputs()
    with pytest.raises(ValueError, match="advantages must be"):
        GRPOLoss()(**dict(kwargs, advantages=torch.zeros(3)))
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        GRPOLoss()(**dict(kwargs, mask=kwargs["mask"][:, :3]))
    with pytest.raises(ValueError, match="group_ids"):
        ESPOLoss(vocab_size=8)(**kwargs, group_ids=torch.zeros(4, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ESPOLoss(high_entropy_fraction=1.5), "ESPOLoss: high_entropy_fraction must be in (0, 1], got 1.5"),
        (lambda: ESPOLoss(high_entropy_fraction=0.0), "high_entropy_fraction must be in (0, 1]"),
        (lambda: ESPOLoss(alpha=-1.0), "ESPOLoss: alpha must be in (0, inf)"),
        (lambda: ESPOLoss(grouping="median"), "ESPOLoss: grouping must be one of"),
        (lambda: ESPOLoss(num_groups=0), "ESPOLoss: num_groups must be an integer >= 1"),
        (lambda: ESPOLoss(grouping="threshold"), "needs a non-empty ascending list of thresholds"),
        (lambda: ESPOLoss(grouping="threshold", thresholds=[1.0, 0.5]), "strictly ascending"),
        (lambda: ESPOLoss(epsilon_low=1.5), "ESPOLoss: epsilon_low must be in [0, 1], got 1.5"),
        (lambda: ESPOLoss(epsilon_high=-0.1), "ESPOLoss: epsilon_high must be in [0, inf)"),
        (lambda: ESPOLoss(epsilon_min=0.2, epsilon_max=0.1), "ESPOLoss: epsilon_max must be in [0.2, inf)"),
        (lambda: ESPOLoss(vocab_size=1), "ESPOLoss: vocab_size must be an integer >= 2"),
        (lambda: ESPOLoss(scope="global"), "ESPOLoss: scope must be"),
        (lambda: ESPOLoss(grouping="token", scope="batch"), "scope='batch' applies to grouping"),
        (lambda: ESPOLoss(beta=-0.1), "ESPOLoss: beta must be in [0, inf)"),
        (lambda: ESPOLoss(kl_estimator="k4"), "ESPOLoss: kl_estimator must be one of"),
        (lambda: GRPOLoss(epsilon_low=2.0), "GRPOLoss: epsilon_low must be in [0, 1]"),
        (lambda: GRPOLoss(loss_aggregation="sum"), "GRPOLoss: loss_aggregation must be one of"),
        (lambda: GSPOLoss(epsilon_high=math.nan), "GSPOLoss: epsilon_high must be in [0, inf)"),
        (lambda: CISPOLoss(epsilon_low=-1.0), "CISPOLoss: epsilon_low must be in [0, 1]"),
        (lambda: GMPOLoss(epsilon_high=-0.4), "GMPOLoss: epsilon_high must be in [0, inf)"),
    ],
)
def test_constructor_validation(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)
