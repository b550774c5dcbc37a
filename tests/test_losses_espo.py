"""ESPOLoss: a case derived by hand, a loop-based reference for every grouping mode, the
stop-gradient construction, prepare() and the per-group metrics."""
import math

import pytest
import torch

from espo_lightning.losses import ESPOLoss
from grouping_reference import reference_groups

V = 100  # vocabulary size of the hand case: log V = ln 100
LN_V = math.log(V)


def hand_case():
    """Two responses, T = 4, top_fraction with rho = 0.5, alpha = 0.02, V = 100 (float64).

    Response 0 (n = 4, A = +1): ent [2.0, 0.5, 1.0, 0.1] -> ceil(0.5*4) = 2 high tokens {0, 2}.
      d = logp - old = [0.1, 0.3, -0.1, 0.1]
      high {0, 2}: log s = (0.1 - 0.1)/2 = 0 -> s = 1; eps = 0.02 * (2.0+1.0)/2 / ln V = 0.03/ln V.
        1 - eps <= 1 <= 1 + eps: unclipped, l = -A s = -1.
      low {1, 3}: log s = (0.3+0.1)/2 = 0.2 -> s = e^0.2; eps = 0.02 * 0.3 / ln V = 0.006/ln V.
        s > 1 + eps and A > 0: clipped high, l = -A (1 + eps) = -(1 + 0.006/ln V), gradient 0.
    Response 1 (n = 3, A = -2; position 3 padded): ent [0.3, 0.9, 0.6] -> ceil(1.5) = 2 high {1, 2}.
      d = [0.0005, 0.0, -0.02]
      high {1, 2}: log s = -0.01, s = e^-0.01 = 0.99005; eps = 0.02 * 0.75 / ln V = 0.015/ln V =
        0.003257 -> s < 1 - eps and A < 0: clipped low, l = -A (1 - eps) = 2 (1 - 0.015/ln V), grad 0.
      low {0}: log s = 0.0005, s = e^0.0005; eps = 0.006/ln V = 0.0013 -> unclipped, l = -A s = 2 e^0.0005.
    Token weights w = 1 / (|g| * groups_i * responses): response 0: 1/(2*2*2) = 1/8 on all four;
    response 1: high 1/(2*2*2) = 1/8, low 1/(1*2*2) = 1/4.
    loss = 2/8 (-1) + 2/8 (-(1 + 0.006/ln V)) + 2/8 * 2 (1 - 0.015/ln V) + 1/4 * 2 e^0.0005
    d loss / d logp = -A s w where unclipped, else 0:
      response 0: [-1/8, 0, -1/8, 0]; response 1: [-(-2) e^0.0005 / 4, 0, 0, 0 (pad)].
    """
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    d = torch.tensor([[0.1, 0.3, -0.1, 0.1], [0.0005, 0.0, -0.02, 0.0]], dtype=torch.float64)
    logp = (old + d).requires_grad_()
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    ent = torch.tensor([[2.0, 0.5, 1.0, 0.1], [0.3, 0.9, 0.6, 7.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return logp, old, adv, mask, ent


def test_hand_case_loss_gradient_and_metrics():
    logp, old, adv, mask, ent = hand_case()
    loss_fn = ESPOLoss(alpha=0.02, high_entropy_fraction=0.5, vocab_size=V)
    loss, metrics = loss_fn(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)
    e = math.exp(0.0005)
    expected = -2 / 8 - 2 / 8 * (1 + 0.006 / LN_V) + 2 / 8 * 2 * (1 - 0.015 / LN_V) + 1 / 4 * 2 * e
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    expected_grad = torch.tensor([[-1 / 8, 0, -1 / 8, 0], [2 * e / 4, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-12, atol=1e-15)

    # 7 valid tokens: clipped low = response 1's high group (2), clipped high = response 0's low group (2).
    approx = lambda v: pytest.approx(v, rel=1e-9)  # noqa: E731
    assert metrics["clip/low"].item() == approx(2 / 7)
    assert metrics["clip/high"].item() == approx(2 / 7)
    assert metrics["clip/total"].item() == approx(4 / 7)
    assert metrics["grad_util/token"].item() == approx(3 / 7)
    assert metrics["grad_util/sequence"].item() == approx(1.0)
    ratios = [1, 1, math.exp(0.2), math.exp(0.2), math.exp(-0.01), math.exp(-0.01), e]
    assert metrics["ratio/mean"].item() == approx(sum(ratios) / 7)
    assert metrics["ratio/max"].item() == approx(math.exp(0.2))
    assert metrics["count/tokens"].item() == 7 and metrics["count/sequences"].item() == 2
    # group 0 (high): tokens ent 2.0, 1.0 (resp 0) and 0.9, 0.6 (resp 1)
    assert metrics["entropy_group/0/size_frac"].item() == approx(4 / 7)
    assert metrics["entropy_group/0/entropy_mean"].item() == approx((2.0 + 1.0 + 0.9 + 0.6) / 4)
    assert metrics["entropy_group/0/epsilon_mean"].item() == approx((2 * 0.03 + 2 * 0.015) / 4 / LN_V)
    assert metrics["entropy_group/0/clip_frac"].item() == approx(2 / 4)
    assert metrics["entropy_group/0/ratio_mean"].item() == approx((2 + 2 * math.exp(-0.01)) / 4)
    assert metrics["entropy_group/1/size_frac"].item() == approx(3 / 7)
    assert metrics["entropy_group/1/entropy_mean"].item() == approx((0.5 + 0.1 + 0.3) / 3)
    assert metrics["entropy_group/1/epsilon_mean"].item() == approx((2 * 0.006 + 0.006) / 3 / LN_V)
    assert metrics["entropy_group/1/clip_frac"].item() == approx(2 / 3)
    assert metrics["entropy_group/1/ratio_mean"].item() == approx((2 * math.exp(0.2) + e) / 3)
    assert all(not v.requires_grad for v in metrics.values())


def reference_espo(logp, old, adv, mask, ent, group_ids, eps_fn):
    """Loop-based ESPO straight from DESIGN eq. 5-10: returns (loss, d loss / d logp) as floats."""
    B, T = mask.shape
    adv = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    responses = [i for i in range(B) if mask[i].any()]
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for i in responses:
        groups = sorted({int(g) for g in group_ids[i][mask[i]]})
        for g in groups:
            toks = [t for t in range(T) if mask[i, t] and group_ids[i, t] == g]
            log_s = sum(float(logp[i, t] - old[i, t]) for t in toks) / len(toks)
            s = math.exp(min(max(log_s, -20.0), 20.0))
            lo, hi = eps_fn(sum(float(ent[i, t]) for t in toks) / len(toks))
            w = 1.0 / (len(toks) * len(groups) * len(responses))
            for t in toks:
                a = float(adv[i, t])
                loss += w * -min(s * a, min(max(s, 1 - lo), 1 + hi) * a)
                clipped = (s > 1 + hi and a > 0) or (s < 1 - lo and a < 0)
                grad[i, t] = 0.0 if clipped else -a * s * w
    return loss, grad


def random_batch(seed, B=5, T=9, spread=3e-3, per_token_adv=False):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    logp = (old + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(B, T, generator=gen) < 0.75
    mask[1] = False  # an empty response
    mask[2, 1:] = False  # a length-1 response
    ent = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    ent[3, :4] = 1.5  # ties
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen, dtype=torch.float64)
    adv[0] = 0.0
    return logp, old, adv, mask, ent


MODES = [
    dict(grouping="top_fraction", high_entropy_fraction=0.3),
    dict(grouping="quantile", num_groups=3),
    dict(grouping="threshold", thresholds=[0.8, 2.0]),
    dict(grouping="token"),
    dict(grouping="sequence"),
    dict(grouping="top_fraction", scope="batch"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_matches_loop_reference(mode, adaptive, per_token_adv):
    """Loss and gradient equal the loop reference; an unclipped token's gradient is
    -A s_g / (|g| groups_i responses), a clipped one's is 0 (both computed by the reference)."""
    loss_fn = ESPOLoss(alpha=0.05, adaptive_clip=adaptive, epsilon_low=1e-3, epsilon_high=2e-3,
                       epsilon_min=1e-4 if adaptive else None, vocab_size=50, **mode)
    clip_fractions = []
    for seed in range(3):
        logp, old, adv, mask, ent = random_batch(seed, spread=0.03 if adaptive else 3e-3, per_token_adv=per_token_adv)
        group_ids = reference_groups(ent, mask, **mode)
        loss, metrics = loss_fn(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)
        loss.backward()
        clip_fractions.append(metrics["clip/total"].item())

        def eps_fn(mean_ent):
            if not adaptive:
                return 1e-3, 2e-3
            e = max(0.05 * mean_ent / math.log(50), 1e-4)
            return e, e

        ref_loss, ref_grad = reference_espo(logp.detach(), old, adv, mask, ent, group_ids, eps_fn)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-14)
        torch.testing.assert_close(logp.grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert 0 < max(clip_fractions) and min(clip_fractions) < 1  # both branches were exercised


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_prepare_and_forward_group_as_the_loop_reference(mode):
    """``prepare`` (what the trainer calls once per rollout) gives the loop reference's groups, and
    ``forward`` without ``group_ids`` (grouping by itself) the same loss, gradient and metrics as
    ``forward`` given the reference's groups."""
    loss_fn = ESPOLoss(vocab_size=50, **mode)
    for seed in range(4):
        logp, old, adv, mask, ent = random_batch(seed)
        want = reference_groups(ent, mask, **mode)
        if mode["grouping"] != "sequence":
            assert len(set(want[mask].tolist())) > 1, "one group only: the check would be vacuous"
        assert torch.equal(loss_fn.prepare(ent, mask), want), seed
        kwargs = dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)
        loss_a, metrics_a = loss_fn(**kwargs)
        (grad_a,) = torch.autograd.grad(loss_a, logp)
        loss_b, metrics_b = loss_fn(**kwargs, group_ids=want)
        (grad_b,) = torch.autograd.grad(loss_b, logp)
        assert loss_a.item() == loss_b.item() and torch.equal(grad_a, grad_b)
        assert metrics_a.keys() == metrics_b.keys()
        for key in metrics_a:
            assert torch.equal(metrics_a[key], metrics_b[key]), key


def test_empty_groups_are_dropped():
    """quantile K = 4 on a 2-token response: bins 0 and 2 are used, 1 and 3 empty.
    groups_i = 2, so each token weighs 1/(1 * 2 * 1) = 1/2 (not 1/4), and with s = 1, A = 1
    (unclipped): loss = 2 * 1/2 * (-1) = -1, gradient -1/2 per token; empty-group metrics are 0."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    loss_fn = ESPOLoss(grouping="quantile", num_groups=4, vocab_size=10)
    loss, metrics = loss_fn(
        logprobs=logp, old_logprobs=logp.detach().clone(), advantages=torch.ones(1, dtype=torch.float64),
        mask=torch.ones(1, 2, dtype=torch.bool), entropies=torch.tensor([[0.1, 0.9]], dtype=torch.float64),
    )
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, -0.5]]
    assert metrics["entropy_group/1/size_frac"].item() == 0 and metrics["entropy_group/3/ratio_mean"].item() == 0
    assert metrics["entropy_group/0/size_frac"].item() == 0.5 and metrics["entropy_group/2/entropy_mean"].item() == 0.1


def test_epsilon_bounds_and_metric_keys():
    """eps_g = alpha * mean ent / ln V clamped to [epsilon_min, epsilon_max]; with alpha = 1, V = e^2
    rounded (V = 7, ln 7 = 1.9459) and entropies 10 / 0.001 the raw eps would be 5.14 / 0.0005,
    clamped to 0.1 / 0.01."""
    loss_fn = ESPOLoss(alpha=1.0, high_entropy_fraction=0.5, epsilon_min=0.01, epsilon_max=0.1, vocab_size=7)
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    _, metrics = loss_fn(logprobs=logp, old_logprobs=torch.zeros(1, 2, dtype=torch.float64),
                         advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 2, dtype=torch.bool),
                         entropies=torch.tensor([[10.0, 0.001]], dtype=torch.float64))
    assert metrics["entropy_group/0/epsilon_mean"].item() == pytest.approx(0.1)
    assert metrics["entropy_group/1/epsilon_mean"].item() == pytest.approx(0.01)
    expected_groups = {"top_fraction": 2, "quantile": 3, "threshold": 3, "sequence": 1}
    for grouping, k in expected_groups.items():
        fn = ESPOLoss(grouping=grouping, num_groups=3, thresholds=[0.5, 1.0], vocab_size=7)
        _, metrics = fn(logprobs=logp, old_logprobs=logp.detach(), advantages=torch.ones(1, dtype=torch.float64),
                        mask=torch.ones(1, 2, dtype=torch.bool), entropies=torch.ones(1, 2, dtype=torch.float64))
        group_keys = {key for key in metrics if key.startswith("entropy_group/")}
        assert group_keys == {f"entropy_group/{i}/{n}" for i in range(k)
                              for n in ("size_frac", "entropy_mean", "epsilon_mean", "clip_frac", "ratio_mean")}
        assert ("clip/sequence" in metrics) == (grouping == "sequence")
    _, metrics = ESPOLoss(grouping="token", vocab_size=7)(
        logprobs=logp, old_logprobs=logp.detach(), advantages=torch.ones(1, dtype=torch.float64),
        mask=torch.ones(1, 2, dtype=torch.bool), entropies=torch.ones(1, 2, dtype=torch.float64))
    assert not any(key.startswith("entropy_group/") for key in metrics)


def test_vocab_size_and_entropies_required_for_adaptive_clip():
    kwargs = dict(logprobs=torch.zeros(1, 2), old_logprobs=torch.zeros(1, 2), advantages=torch.ones(1),
                  mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="set_vocab_size"):
        ESPOLoss()(**kwargs, entropies=torch.ones(1, 2))
    with pytest.raises(ValueError, match="entropies"):
        ESPOLoss(vocab_size=10)(**kwargs)
    loss_fn = ESPOLoss()
    loss_fn.set_vocab_size(10)
    assert loss_fn.vocab_size == 10 and loss_fn.needs_entropies
    loss_fn(**kwargs, entropies=torch.ones(1, 2))
    # fixed clipping with token / sequence grouping needs no entropies at all
    ESPOLoss(grouping="sequence", adaptive_clip=False)(**kwargs)
