"""The two reductions DESIGN section 2 pins down, checked against independent implementations:
ESPO(grouping=sequence, fixed eps) == GSPO and ESPO(grouping=token, fixed eps) == GRPO, in loss,
gradient and every shared metric. GSPO and GRPO are plain masked means with autograd through the
ratio; ESPO uses slot tables and a closed-form gradient, so these tests compare two computations."""
import pytest
import torch

from espo_lightning.losses import ESPOLoss, GRPOLoss, GSPOLoss


def batch(seed, dtype, spread, per_token_adv):
    gen = torch.Generator().manual_seed(seed)
    B, T = 6, 11
    old = (-torch.rand(B, T, generator=gen) * 4).to(dtype)
    logp = (old + spread * torch.randn(B, T, generator=gen).to(dtype)).requires_grad_()
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[1] = False  # empty response
    mask[4, 1:] = False  # length-1 response
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen).to(dtype)
    adv[2] = 0.0
    ent = torch.rand(B, T, generator=gen).to(dtype) * 3
    return dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)


def compare(espo, other, kwargs, dtype):
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    loss_a, metrics_a = espo(**kwargs)
    (grad_a,) = torch.autograd.grad(loss_a, kwargs["logprobs"])
    loss_b, metrics_b = other(**kwargs)
    (grad_b,) = torch.autograd.grad(loss_b, kwargs["logprobs"])
    torch.testing.assert_close(loss_a, loss_b, **tol)
    torch.testing.assert_close(grad_a, grad_b, **tol)
    assert set(metrics_b) <= set(metrics_a)
    for key, value in metrics_b.items():
        torch.testing.assert_close(metrics_a[key], value, **tol, msg=key)
    return metrics_b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_espo_sequence_grouping_equals_gspo(dtype, per_token_adv):
    espo = ESPOLoss(grouping="sequence", adaptive_clip=False, epsilon_low=3e-4, epsilon_high=4e-4)
    gspo = GSPOLoss(epsilon_low=3e-4, epsilon_high=4e-4)
    clipped = []
    for seed in range(4):
        metrics = compare(espo, gspo, batch(seed, dtype, 2e-3, per_token_adv), dtype)
        clipped.append(metrics["clip/sequence"].item())
    assert 0 < max(clipped) and min(clipped) < 1  # both the clipped and the unclipped branch ran


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_espo_token_grouping_equals_grpo(dtype, per_token_adv):
    espo = ESPOLoss(grouping="token", adaptive_clip=False, epsilon_low=0.2, epsilon_high=0.28)
    grpo = GRPOLoss(epsilon_low=0.2, epsilon_high=0.28, loss_aggregation="seq_mean_token_mean")
    for seed in range(4):
        metrics = compare(espo, grpo, batch(seed, dtype, 0.3, per_token_adv), dtype)
        assert 0 < metrics["clip/total"].item() < 1


@pytest.mark.parametrize("beta", [0.05])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_identities_hold_with_kl(beta, estimator):
    kwargs = batch(0, torch.float64, 0.3, False)
    kwargs["ref_logprobs"] = kwargs["old_logprobs"] + 0.1
    espo = ESPOLoss(grouping="token", adaptive_clip=False, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                    kl_estimator=estimator)
    compare(espo, GRPOLoss(0.2, 0.28, beta=beta, kl_estimator=estimator), kwargs, torch.float64)
    espo = ESPOLoss(grouping="sequence", adaptive_clip=False, beta=beta, kl_estimator=estimator)
    compare(espo, GSPOLoss(beta=beta, kl_estimator=estimator), kwargs, torch.float64)
