"""GSPO, GRPO / DAPO, CISPO and GMPO on small cases derived by hand (float64)."""
import math

import pytest
import torch

from espo_lightning.losses import CISPOLoss, GMPOLoss, GRPOLoss, GSPOLoss

F64 = torch.float64


def make(d_rows, mask_rows, adv, old=-1.0):
    """logp = old + d on a [B, T] grid (padding positions filled with 0 in d)."""
    d = torch.tensor(d_rows, dtype=F64)
    old_logp = torch.full_like(d, old)
    logp = (old_logp + d).requires_grad_()
    return logp, old_logp, torch.tensor(adv, dtype=F64), torch.tensor(mask_rows)


def test_gspo_by_hand():
    """Response 0 (n = 3, A = +1): d = [0.1, -0.1, 0.3], log s = 0.3/3 = 0.1, s = e^0.1 = 1.105 >
    1 + 4e-4 and A > 0 -> clipped high: l = -(1 + 4e-4) on each token, gradient 0.
    Response 1 (n = 2, A = -0.5, one pad): d = [2e-4, -2e-4], log s = 0, s = 1, unclipped:
    l = -A s = 0.5, d l/d logp_t = -A s = 0.5 -> weighted by 1/(n_i * responses) = 1/4: 0.125.
    loss = mean over responses of the token means = (-(1.0004) + 0.5) / 2 = -0.2502."""
    logp, old, adv, mask = make([[0.1, -0.1, 0.3], [2e-4, -2e-4, 0.0]], [[1, 1, 1], [1, 1, 0]], [1.0, -0.5])
    loss, metrics = GSPOLoss()(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask.bool())
    assert loss.item() == pytest.approx(-0.2502, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, 0, 0], [0.125, 0.125, 0]], dtype=F64))
    assert metrics["clip/sequence"].item() == pytest.approx(0.5)
    assert metrics["clip/high"].item() == pytest.approx(3 / 5) and metrics["clip/low"].item() == 0
    assert metrics["grad_util/token"].item() == pytest.approx(2 / 5)
    assert metrics["grad_util/sequence"].item() == pytest.approx(1 / 2)
    assert metrics["ratio/mean"].item() == pytest.approx((3 * math.exp(0.1) + 2) / 5)
    assert metrics["ratio/max"].item() == pytest.approx(math.exp(0.1))


GRPO_CASE = dict(
    d_rows=[[math.log(1.5), math.log(0.7), 0.0], [math.log(0.5), math.log(1.1), 0.0]],
    mask_rows=[[1, 1, 1], [1, 1, 0]],
    adv=[1.0, -1.0],
)


def test_grpo_by_hand():
    """eps = 0.2 / 0.28. Response 0 (A = +1): r = [1.5, 0.7, 1]:
      1.5 > 1.28 -> clipped high, l = -1.28, grad 0;
      0.7 < 0.8 but A > 0 -> min(0.7, 0.8) = 0.7 is unclipped, l = -0.7, dl/dlogp = -A r = -0.7;
      1.0 -> l = -1, dl/dlogp = -1.
    Response 1 (A = -1): r = [0.5, 1.1]:
      0.5 < 0.8 and A < 0 -> clipped low, l = -(0.8 * -1) = 0.8, grad 0;
      1.1: min(-1.1, -1.1) -> l = 1.1, dl/dlogp = -A r = 1.1.
    seq_mean_token_mean: ((-1.28 - 0.7 - 1)/3 + (0.8 + 1.1)/2) / 2, weights 1/6 and 1/4.
    token_mean (DAPO): (-1.28 - 0.7 - 1 + 0.8 + 1.1) / 5 = -1.08 / 5, weights 1/5."""
    logp, old, adv, mask = make(**GRPO_CASE)
    loss, metrics = GRPOLoss(0.2, 0.28)(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask.bool())
    assert loss.item() == pytest.approx(((-1.28 - 0.7 - 1) / 3 + (0.8 + 1.1) / 2) / 2, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -0.7 / 6, -1 / 6], [0, 1.1 / 4, 0]], dtype=F64))
    assert metrics["clip/low"].item() == pytest.approx(1 / 5) and metrics["clip/high"].item() == pytest.approx(1 / 5)
    assert metrics["grad_util/token"].item() == pytest.approx(3 / 5)
    assert metrics["ratio/max"].item() == pytest.approx(1.5)

    logp, old, adv, mask = make(**GRPO_CASE)
    dapo = GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean")
    loss, _ = dapo(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask.bool())
    assert loss.item() == pytest.approx(-1.08 / 5, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -0.7 / 5, -1 / 5], [0, 1.1 / 5, 0]], dtype=F64))


def test_cispo_by_hand():
    """eps 0.2 / 0.28 (truncation to [0.8, 1.28]); N = 5 valid tokens.
    Response 0 (A = +1): logp = [-1, -2, -0.5], r = [2, 0.5, 1] -> sg weights [1.28, 0.8, 1].
    Response 1 (A = -2): logp = [-0.3, -1.5], r = [1.1, 1] -> weights [1.1, 1].
    loss = -(1.28*1*-1 + 0.8*1*-2 + 1*1*-0.5 + 1.1*-2*-0.3 + 1*-2*-1.5) / 5 = -(0.28) / 5 = -0.056.
    dl/dlogp = -weight * A / 5: [-1.28, -0.8, -1] / 5 and [2.2, 2] / 5 (truncation keeps the gradient).
    Metrics: clip/high = 1/5 (r = 2, A > 0); clip/low = 0 (r = 0.5 has A > 0); truncated = 2/5."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, 0.0]], dtype=F64, requires_grad=True)
    r = torch.tensor([[2.0, 0.5, 1.0], [1.1, 1.0, 1.0]], dtype=F64)
    old = logp.detach() - r.log()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    loss, metrics = CISPOLoss(0.2, 0.28)(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)
    assert loss.item() == pytest.approx(-0.056, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.28, -0.8, -1.0], [2.2, 2.0, 0.0]], dtype=F64) / 5)
    assert metrics["clip/high"].item() == pytest.approx(0.2) and metrics["clip/low"].item() == 0
    assert metrics["clip/truncated"].item() == pytest.approx(0.4)
    assert metrics["grad_util/token"].item() == 1.0


def test_cispo_defaults_cap_the_weight_at_four():
    """Defaults eps_low = 1 (no lower truncation), eps_high = 3: r = 5 -> weight 4, r = 0.01 -> 0.01.
    loss = -(4 * 1 * -1 + 0.01 * 1 * -1) / 2 = 2.005."""
    logp = torch.tensor([[-1.0, -1.0]], dtype=F64, requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(5.0), math.log(0.01)]], dtype=F64)
    loss, _ = CISPOLoss()(logprobs=logp, old_logprobs=old, advantages=torch.ones(1, dtype=F64),
                          mask=torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(2.005, rel=1e-12)


def test_gmpo_by_hand():
    """eps 0.4 / 0.4 in log space.
    Response 0 (A = +1, n = 3): log r = [0.5, -0.5, 0.2]; c = min(lr, clip(lr, -0.4, 0.4)) =
      [0.4 (clipped: constant), -0.5 (min keeps lr: gradient flows), 0.2] -> mean c = 0.1/3;
      objective e^(1/30); d(-obj/2)/dlogp_t = -A e^(1/30) / (3 * 2) on tokens 1, 2, 0 on token 0.
    Response 1 (A = -1, n = 2, one pad): log r = [-0.6, 0.1]; c = max(lr, clip) = [-0.4 (clipped),
      0.1] -> mean c = -0.15; objective -e^-0.15; gradient on token 1: -A e^-0.15 / (2 * 2).
    loss = -(e^(1/30) - e^-0.15) / 2."""
    logp, old, adv, mask = make([[0.5, -0.5, 0.2], [-0.6, 0.1, 0.0]], [[1, 1, 1], [1, 1, 0]], [1.0, -1.0])
    loss, metrics = GMPOLoss()(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask.bool())
    a, b = math.exp(1 / 30), math.exp(-0.15)
    assert loss.item() == pytest.approx(-(a - b) / 2, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -a / 6, -a / 6], [0, b / 4, 0]], dtype=F64))
    assert metrics["clip/high"].item() == pytest.approx(1 / 5) and metrics["clip/low"].item() == pytest.approx(1 / 5)
    assert metrics["grad_util/token"].item() == pytest.approx(3 / 5)
    assert metrics["ratio/max"].item() == pytest.approx(math.exp(0.5))


def test_gmpo_per_token_advantages_use_the_response_mean():
    logp, old, adv, mask = make([[0.1, -0.2], [0.3, 0.0]], [[1, 1], [1, 0]], [0.5, -1.0])
    per_token = torch.tensor([[0.5, 0.5], [-1.0, 123.0]], dtype=F64)  # padding value is ignored
    a, _ = GMPOLoss()(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask.bool())
    b, _ = GMPOLoss()(logprobs=logp, old_logprobs=old, advantages=per_token, mask=mask.bool())
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
