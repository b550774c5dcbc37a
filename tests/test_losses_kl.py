"""KL estimators and the KL penalty, by hand."""
import math

import pytest
import torch

from espo_lightning.losses import CISPOLoss, ESPOLoss, GMPOLoss, GRPOLoss, GSPOLoss, kl_divergence

F64 = torch.float64


def test_estimators_by_hand():
    """logp = [-1, -2], ref = [-1.5, -1]: d = ref - logp = [-0.5, 1].
    k1 = logp - ref = [0.5, -1]; d/dlogp = 1.
    k2 = d^2 / 2 = [0.125, 0.5]; d/dlogp = logp - ref = [0.5, -1].
    k3 = e^d - d - 1 = [e^-0.5 - 0.5, e - 2]; d/dlogp = 1 - e^d = [1 - e^-0.5, 1 - e]."""
    ref = torch.tensor([-1.5, -1.0], dtype=F64)
    expected = {
        "k1": ([0.5, -1.0], [1.0, 1.0]),
        "k2": ([0.125, 0.5], [0.5, -1.0]),
        "k3": ([math.exp(-0.5) - 0.5, math.e - 2], [1 - math.exp(-0.5), 1 - math.e]),
    }
    for estimator, (value, grad) in expected.items():
        logp = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
        kl = kl_divergence(logp, ref, estimator)
        torch.testing.assert_close(kl, torch.tensor(value, dtype=F64))
        kl.sum().backward()
        torch.testing.assert_close(logp.grad, torch.tensor(grad, dtype=F64))


def test_k3_is_finite_for_huge_log_ratios():
    logp = torch.tensor([-100.0, 0.0], requires_grad=True)
    kl = kl_divergence(logp, torch.tensor([0.0, -100.0]), "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all() and (kl >= 0).all()


def test_penalty_uses_the_loss_token_weights():
    """A = 0 makes the policy term 0, so loss = beta * sum_t w_t k1_t.
    k1 = logp - ref = [[0.2, 0.4, (pad)], [0.6, (pad), (pad)]].
    GRPO seq-mean-token-mean: w = 1/(2*2) on response 0, 1/(1*2) on response 1:
      loss = 0.1 * ((0.2 + 0.4)/4 + 0.6/2) = 0.1 * 0.45 = 0.045; kl/mean = 1.2 / 3 = 0.4.
    DAPO token mean: 0.1 * 1.2 / 3 = 0.04. CISPO: token mean too. GSPO and GMPO: per-response means."""
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.4, 5.0], [-1.6, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    kwargs = dict(logprobs=logp, old_logprobs=logp.detach(), advantages=torch.zeros(2, dtype=F64), mask=mask,
                  ref_logprobs=ref, entropies=torch.ones(2, 3, dtype=F64))
    cases = [
        (GRPOLoss(beta=0.1, kl_estimator="k1"), 0.045),
        (GRPOLoss(beta=0.1, kl_estimator="k1", loss_aggregation="token_mean"), 0.04),
        (CISPOLoss(beta=0.1, kl_estimator="k1"), 0.04),
        (GSPOLoss(beta=0.1, kl_estimator="k1"), 0.045),
        (GMPOLoss(beta=0.1, kl_estimator="k1"), 0.045),
        (ESPOLoss(beta=0.1, kl_estimator="k1", grouping="sequence", vocab_size=10), 0.045),
    ]
    for loss_fn, expected in cases:
        assert loss_fn.needs_reference
        loss, metrics = loss_fn(**kwargs)
        assert loss.item() == pytest.approx(expected, rel=1e-12), type(loss_fn).__name__
        assert metrics["kl/mean"].item() == pytest.approx(0.4)
    # ESPO top_fraction: response 0 splits into two groups of 1 -> w = 1/(1*2*2) each, same total 0.045
    loss, _ = ESPOLoss(beta=0.1, kl_estimator="k1", high_entropy_fraction=0.5, vocab_size=10)(**kwargs)
    assert loss.item() == pytest.approx(0.045, rel=1e-12)


def test_missing_reference_is_a_clear_error():
    kwargs = dict(logprobs=torch.zeros(1, 2), old_logprobs=torch.zeros(1, 2), advantages=torch.ones(1),
                  mask=torch.ones(1, 2, dtype=torch.bool), entropies=torch.ones(1, 2))
    for loss_fn in (GRPOLoss(beta=0.1), GSPOLoss(beta=0.1), CISPOLoss(beta=0.1), GMPOLoss(beta=0.1),
                    ESPOLoss(beta=0.1, vocab_size=10)):
        with pytest.raises(ValueError, match="needs ref_logprobs"):
            loss_fn(**kwargs)
    loss_fn = GRPOLoss()
    assert not loss_fn.needs_reference
    _, metrics = loss_fn(**kwargs)  # beta = 0: no reference needed, no kl metric
    assert "kl/mean" not in metrics
