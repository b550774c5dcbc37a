"""SAPO, Clip-Cov, KL-Cov and the high-entropy token mask (issue 31): small cases derived by hand,
gradient checks, independent loop transcriptions of each formula as its paper and TRL's / verl's code
state it, and the minibatch-wide token choice under micro-batches (one process; the 2-rank run is
``test_entropy_aware_distributed.py``)."""
from __future__ import annotations

import math

import pytest
import torch

from espo_lightning.losses import ClipCovLoss, GRPOLoss, HighEntropyMaskLoss, KLCovLoss, SAPOLoss
from espo_lightning.losses.base import Normalizer
from espo_lightning.losses.entropy_mask import pack, unpack
from espo_lightning.losses.selection import linear_quantile, token_covariance

F64 = torch.float64


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_case(seed: int, b: int = 6, t: int = 7, spread: float = 0.3, token_adv: bool = False):
    """A float64 minibatch with ragged responses, per-response (or per-token) advantages, and
    entropies; every response has at least one valid token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(b, t, generator=g, dtype=F64) if token_adv else torch.randn(b, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64) * 2
    return dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)


def _grad(loss_fn, case, **extra):
    logp = case["logprobs"].detach().clone().requires_grad_()
    loss, metrics = loss_fn(**{**case, "logprobs": logp}, **extra)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def _per_token_adv(adv, i, t):
    return float(adv[i, t]) if adv.dim() == 2 else float(adv[i])


# ----- SAPO ------------------------------------------------------------------------------------
def test_sapo_by_hand():
    """f_tau(r) = (4 / tau) sigmoid(tau (r - 1)); gate weight g = 4 s (1 - s), dl/dlogp = -A g r w.
    Response 0 (A = +1, tau_pos = 1), r = [1, e^0.5 = 1.6487]:
      r = 1: f = 4 * 0.5 = 2, l = -2, g = 1 (the unclipped policy gradient), dl/dlogp = -1 * 1 * 1 * w;
      r = e^0.5: s = sigmoid(0.6487) = 0.65672, f = 2.62689, l = -2.62689, g = 0.90174.
    Response 1 (A = -1, tau_neg = 1.05), one token, r = 1: f = 2 / 1.05 = 1.90476, l = +1.90476, g = 1,
      dl/dlogp = +1 * w.
    seq_mean_token_mean: w = 1 / (n_i * 2) = 1/4, 1/4 and 1/2; loss = ((-2 - 2.62689) / 2 + 1.90476) / 2.
    Nothing is "clipped" (every g >= 1/2)."""
    old = torch.full((2, 2), -1.0, dtype=F64)
    logp = (old + torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=F64)).requires_grad_()
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = SAPOLoss()(logprobs=logp, old_logprobs=old, advantages=torch.tensor([1.0, -1.0], dtype=F64),
                               mask=mask)
    r1 = math.exp(0.5)
    s1 = sig(r1 - 1)
    assert loss.item() == pytest.approx(((-2 - 4 * s1) / 2 + 2 / 1.05) / 2, rel=1e-12)
    loss.backward()
    expected = torch.tensor([[-1 / 4, -4 * s1 * (1 - s1) * r1 / 4], [1 / 2, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=0)
    assert metrics["clip/total"].item() == 0 and metrics["grad_util/token"].item() == 1
    assert metrics["gate/weight_mean"].item() == pytest.approx((1 + 4 * s1 * (1 - s1) + 1) / 3)


def test_sapo_soft_clip_metric_by_hand():
    """A > 0 with r = e^1.5 = 4.48: s = sigmoid(3.48) = 0.9701, g = 4 s (1 - s) = 0.116 < 1/2: clipped
    high, yet its gradient -A g r w = -0.116 * 4.48 / 2 is not zero (a soft gate never zeroes it).
    A < 0 with r = e^-2 = 0.135: s = sigmoid(1.05 * -0.865) = 0.287, g = 0.819 >= 1/2: not clipped (at
    tau < 1.76 no ratio > 0 is clipped low). token_mean over 2 tokens."""
    old = torch.zeros(2, 1, dtype=F64)
    logp = torch.tensor([[1.5], [-2.0]], dtype=F64, requires_grad=True)
    loss, metrics = SAPOLoss(loss_aggregation="token_mean")(
        logprobs=logp, old_logprobs=old, advantages=torch.tensor([1.0, -1.0], dtype=F64), mask=torch.ones(2, 1, dtype=torch.bool))
    loss.backward()
    r = math.exp(1.5)
    s = sig(r - 1)
    assert logp.grad[0, 0].item() == pytest.approx(-4 * s * (1 - s) * r / 2, rel=1e-12)
    assert metrics["clip/high"].item() == 0.5 and metrics["clip/low"].item() == 0
    assert metrics["grad_util/token"].item() == 0.5


def sapo_loop(logp, old, adv, mask, tau_pos, tau_neg, aggregation):
    """TRL's ``loss_type="sapo"``, token by token: per_token = -(4/tau) sigmoid(tau (r - 1)) A with tau
    by the sign of A, then the sequence mean of token terms and the mean over responses (or the token
    mean over the batch)."""
    per_response, total, count = [], 0.0, 0
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = _per_token_adv(adv, i, t)
            tau = tau_pos if a > 0 else tau_neg
            r = torch.exp(logp[i, t] - old[i, t])
            terms.append(-(4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * a)
        if terms:
            per_response.append(sum(terms) / len(terms))
            total, count = total + sum(terms), count + len(terms)
    if aggregation == "token_mean":
        return total / count
    return sum(per_response) / len(per_response)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("token_adv", [False, True])
def test_sapo_matches_loop_transcription(aggregation, token_adv):
    case = random_case(1, spread=0.8, token_adv=token_adv)
    loss_fn = SAPOLoss(tau_pos=1.3, tau_neg=2.0, loss_aggregation=aggregation)
    loss, grad, _ = _grad(loss_fn, case)
    logp = case["logprobs"].detach().clone().requires_grad_()
    ref = sapo_loop(logp, case["old_logprobs"], case["advantages"], case["mask"], 1.3, 2.0, aggregation)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-12, atol=1e-15)


def test_sapo_gradient_equals_unclipped_policy_gradient_on_policy():
    """At r = 1 every gate weight is 1: SAPO's gradient is GRPO's with no clip at all."""
    case = random_case(2, spread=0.0)
    _, sapo_grad, _ = _grad(SAPOLoss(), case)
    _, grpo_grad, _ = _grad(GRPOLoss(epsilon_low=1.0, epsilon_high=1e9), case)
    torch.testing.assert_close(sapo_grad, grpo_grad, rtol=1e-12, atol=1e-15)


# ----- the covariance --------------------------------------------------------------------------
def test_covariance_by_hand():
    """A = [+2, -2] per response, old logp [[-1, -3], [-1.5, -2.5]]: mean A = 0, mean logp = -2, so
    cov = A (logp + 2) = [[2, -2], [-1, 1]]."""
    cov, n = token_covariance(torch.tensor([[2.0], [-2.0]], dtype=F64),
                              torch.tensor([[-1.0, -3.0], [-1.5, -2.5]], dtype=F64),
                              torch.ones(2, 2, dtype=torch.bool), distributed=False)
    torch.testing.assert_close(cov, torch.tensor([[2.0, -2.0], [-1.0, 1.0]], dtype=F64))
    assert n.item() == 4


# ----- Clip-Cov --------------------------------------------------------------------------------
def _clip_cov_case(d=None):
    """2 responses x 2 tokens, A = [+2, -2], old logp [[-1, -3], [-1, -3]]: cov = A (logp + 2) =
    [[2, -2], [-2, 2]]; the candidates (1 < cov < 5) are tokens (0, 0) and (1, 1)."""
    old = torch.tensor([[-1.0, -3.0], [-1.0, -3.0]], dtype=F64)
    d = torch.zeros(2, 2, dtype=F64) if d is None else torch.tensor(d, dtype=F64)
    return dict(logprobs=(old + d).requires_grad_(), old_logprobs=old, advantages=torch.tensor([2.0, -2.0], dtype=F64),
                mask=torch.ones(2, 2, dtype=torch.bool))


def test_clip_cov_by_hand():
    """clip_ratio 0.25 of 4 tokens: one token is drawn from the two candidates and detached. On policy
    (r = 1) the PPO term is -A on every token; token_mean weights 1/4:
      (0, 0) drawn: loss = (-2 + 2 + 2) / 4 = +0.5, gradient [[0, -0.5], [0.5, 0.5]];
      (1, 1) drawn: loss = (-2 - 2 + 2) / 4 = -0.5, gradient [[-0.5, -0.5], [0.5, 0]].
    The draw depends on (seed, step) only; over 40 steps both candidates are drawn."""
    loss_fn = ClipCovLoss(clip_ratio=0.25)
    case = _clip_cov_case()
    seen = set()
    for step in range(40):
        ids = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                        mask=case["mask"], step=step, distributed=False)
        again = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                          mask=case["mask"], step=step, distributed=False)
        assert torch.equal(ids, again)
        chosen = tuple(map(tuple, ids.nonzero().tolist()))
        assert chosen in (((0, 0),), ((1, 1),))
        seen.add(chosen)
        loss, grad, metrics = _grad(loss_fn, case, group_ids=ids)
        if chosen == ((0, 0),):
            assert loss.item() == pytest.approx(0.5)
            torch.testing.assert_close(grad, torch.tensor([[0, -0.5], [0.5, 0.5]], dtype=F64))
        else:
            assert loss.item() == pytest.approx(-0.5)
            torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5], [0.5, 0]], dtype=F64))
        assert metrics["cov/selected"].item() == 0.25
        assert metrics["grad_util/token"].item() == 0.75 and metrics["clip/total"].item() == 0
    assert len(seen) == 2


def verl_clip_cov_loop(logp, old, adv, mask, eps_low, eps_high, lb, ub, ratio, draw):
    """verl's ``compute_policy_loss_clip_cov`` token by token, token-mean aggregation. ``draw(candidates,
    count)`` picks which of the candidate (i, t) are detached (verl: a random permutation)."""
    b, t_max = logp.shape
    valid = [(i, t) for i in range(b) for t in range(t_max) if mask[i, t]]
    n = len(valid)
    mean_a = sum(_per_token_adv(adv, i, t) for i, t in valid) / n
    mean_l = sum(float(logp[i, t]) for i, t in valid) / n
    terms, clipped = {}, set()
    for i, t in valid:
        a = _per_token_adv(adv, i, t)
        r = torch.exp(logp[i, t] - old[i, t])
        loss1, loss2 = -a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high)
        terms[i, t] = torch.maximum(loss1, loss2)
        if loss2.item() > loss1.item():
            clipped.add((i, t))
    cov = {(i, t): (_per_token_adv(adv, i, t) - mean_a) * (float(logp[i, t]) - mean_l) for i, t in valid}
    candidates = [k for k in valid if k not in clipped and lb < cov[k] < ub]
    detached = draw(candidates, max(int(ratio * n), 1))
    return sum(terms[k] * (0.0 if k in detached else 1.0) for k in valid) / n, detached


@pytest.mark.parametrize("selection", ["per_call", "minibatch"])
def test_clip_cov_matches_verl_loop_when_every_candidate_is_drawn(selection):
    """With clip_ratio 1 the draw takes every candidate, so verl's random permutation does not matter;
    the current log-probs differ from the old ones (some tokens clipped, covariances move), and per_call
    follows verl exactly. The minibatch choice uses the old log-probs instead: it equals verl's on the
    on-policy step (logp = old) only, so that selection is tested there."""
    case = random_case(3, spread=0.4 if selection == "per_call" else 0.0)
    loss_fn = ClipCovLoss(clip_ratio=1.0, cov_lb=0.05, cov_ub=1.5, epsilon_low=0.1, epsilon_high=0.15,
                          selection=selection)
    loss, grad, metrics = _grad(loss_fn, case)
    logp = case["logprobs"].detach().clone().requires_grad_()
    ref, detached = verl_clip_cov_loop(logp, case["old_logprobs"], case["advantages"], case["mask"], 0.1, 0.15,
                                       0.05, 1.5, 1.0, lambda cands, count: set(cands[:count]))
    ref.backward()
    assert 0 < len(detached) < int(case["mask"].sum())
    assert metrics["cov/selected"].item() == pytest.approx(len(detached) / int(case["mask"].sum()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-12, atol=1e-15)


def test_clip_cov_per_call_draws_count_candidates_never_clipped_ones():
    """verl's rule in a call: exactly max(1, int(ratio n)) tokens, all candidates, none clipped."""
    case = random_case(4, b=8, t=9, spread=0.5)
    loss_fn = ClipCovLoss(clip_ratio=0.1, cov_lb=0.0, cov_ub=10.0, selection="per_call")
    n = int(case["mask"].sum())
    torch.manual_seed(0)
    _, grad, metrics = _grad(loss_fn, case)
    assert metrics["cov/selected"].item() * n == max(1, int(0.1 * n))


# ----- KL-Cov ----------------------------------------------------------------------------------
def test_kl_cov_by_hand():
    """A = [+2, -2], old logp [[-1, -3], [-1.5, -2.5]]: cov = [[2, -2], [-1, 1]] (test above).
    kl_cov_ratio 0.25 of 4 tokens -> the top one, (0, 0). logp = old + [[0.1, 0], [0, 0]]:
      (0, 0): l = -A r + |logp - old| = -2 e^0.1 + 0.1, dl/dlogp = -2 e^0.1 + 1;
      others: l = -A r (unclipped) = -2, 2, 2, dl/dlogp = -2, 2, 2.
    token_mean: loss = (-2 e^0.1 + 0.1 + 2) / 4, gradients / 4."""
    old = torch.tensor([[-1.0, -3.0], [-1.5, -2.5]], dtype=F64)
    logp = (old + torch.tensor([[0.1, 0.0], [0.0, 0.0]], dtype=F64)).requires_grad_()
    for selection in ("minibatch", "per_call"):
        lp = logp.detach().clone().requires_grad_()
        loss, metrics = KLCovLoss(kl_cov_ratio=0.25, selection=selection)(
            logprobs=lp, old_logprobs=old, advantages=torch.tensor([2.0, -2.0], dtype=F64),
            mask=torch.ones(2, 2, dtype=torch.bool))
        loss.backward()
        e = math.exp(0.1)
        assert loss.item() == pytest.approx((-2 * e + 0.1 + 2) / 4, rel=1e-12)
        torch.testing.assert_close(lp.grad, torch.tensor([[(-2 * e + 1) / 4, -0.5], [0.5, 0.5]], dtype=F64))
        assert metrics["cov/selected"].item() == 0.25 and metrics["clip/total"].item() == 0


def verl_kl_cov_loop(logp, old, adv, mask, ratio, coef, ppo_clip=None):
    """verl's ``compute_policy_loss_kl_cov`` token by token, token-mean aggregation: the
    max(1, int(n ratio)) tokens of largest covariance (current log-probs) get -A r + coef |logp - old|,
    the others -A r (or, with ``ppo_clip=(eps_low, eps_high)``, the clipped PPO term)."""
    b, t_max = logp.shape
    valid = [(i, t) for i in range(b) for t in range(t_max) if mask[i, t]]
    n = len(valid)
    mean_a = sum(_per_token_adv(adv, i, t) for i, t in valid) / n
    mean_l = sum(float(logp[i, t]) for i, t in valid) / n
    cov = {(i, t): (_per_token_adv(adv, i, t) - mean_a) * (float(logp[i, t]) - mean_l) for i, t in valid}
    top = set(sorted(valid, key=lambda k: -cov[k])[: max(1, int(n * ratio))])
    total = 0.0
    for i, t in valid:
        a = _per_token_adv(adv, i, t)
        r = torch.exp(logp[i, t] - old[i, t])
        if (i, t) in top:
            total = total + (-a * r + coef * torch.abs(logp[i, t] - old[i, t]))
        elif ppo_clip is None:
            total = total - a * r
        else:
            total = total + torch.maximum(-a * r, -a * torch.clamp(r, 1 - ppo_clip[0], 1 + ppo_clip[1]))
    return total / n, top


@pytest.mark.parametrize("ppo_clip", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_kl_cov_matches_verl_loop(ppo_clip, token_adv):
    case = random_case(5, b=8, t=9, spread=0.4, token_adv=token_adv)
    loss_fn = KLCovLoss(kl_cov_ratio=0.1, kl_coef=0.7, ppo_clip=ppo_clip, epsilon_low=0.1, epsilon_high=0.15,
                        selection="per_call")
    loss, grad, metrics = _grad(loss_fn, case)
    logp = case["logprobs"].detach().clone().requires_grad_()
    ref, top = verl_kl_cov_loop(logp, case["old_logprobs"], case["advantages"], case["mask"], 0.1, 0.7,
                                (0.1, 0.15) if ppo_clip else None)
    ref.backward()
    assert metrics["cov/selected"].item() == pytest.approx(len(top) / int(case["mask"].sum()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-12, atol=1e-15)
    if ppo_clip:
        assert metrics["clip/total"].item() > 0  # the case exercises the clip


def test_kl_cov_minibatch_choice_uses_old_logprobs():
    """On the on-policy step the minibatch choice is verl's; later the covariance is the old one's."""
    case = random_case(6, b=8, t=9, spread=0.0)
    _, grad_mb, _ = _grad(KLCovLoss(kl_cov_ratio=0.1), case)
    _, grad_call, _ = _grad(KLCovLoss(kl_cov_ratio=0.1, selection="per_call"), case)
    torch.testing.assert_close(grad_mb, grad_call, rtol=1e-12, atol=1e-15)
    loss_fn = KLCovLoss(kl_cov_ratio=0.1)
    moved = dict(case, logprobs=(case["old_logprobs"] + 0.5 * torch.randn(8, 9, dtype=F64,
                 generator=torch.Generator().manual_seed(1))).requires_grad_())
    ids = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                    mask=case["mask"], distributed=False)
    cov, _ = token_covariance(case["advantages"].unsqueeze(-1), case["old_logprobs"], case["mask"], False)
    k = max(1, int(0.1 * int(case["mask"].sum())))
    assert torch.equal(ids.bool(), case["mask"] & (cov >= cov[case["mask"]].topk(k).values[-1]))
    _, _, metrics = _grad(loss_fn, moved)  # no group_ids: chosen from these rows' old log-probs
    assert metrics["cov/selected"].item() == pytest.approx(ids.sum().item() / int(case["mask"].sum()))


# ----- the high-entropy mask -------------------------------------------------------------------
def test_linear_quantile_is_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17, 100):
        values = torch.rand(n, generator=g, dtype=F64)
        for q in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
            assert linear_quantile(values, q).item() == torch.quantile(values, q).item()


def test_entropy_mask_by_hand():
    """5 valid tokens with entropies [0.1, 0.5, 0.9, 1.3, 2.0] (one padding), rho = 0.2: the 0.8
    quantile is at rank 0.8 * 4 = 3.2, 1.3 + 0.2 * (2.0 - 1.3) = 1.44, so only the token of entropy 2.0
    (row 1, t = 1) carries gradient. Wrapped GRPO on policy (r = 1), A = [+1, -1]: that token's term is
    -A r = +1, and the normaliser stays the wrapped loss's own:
      token_mean (DAPO): all 5 valid tokens, loss = 1 / 5, gradient 1/5 there, 0 elsewhere;
      seq_mean_token_mean: that response's 2 tokens and 2 responses, loss = 1 / (2 * 2) = 1/4."""
    old = torch.full((2, 3), -1.0, dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ent = torch.tensor([[0.1, 0.5, 0.9], [1.3, 2.0, 9.0]], dtype=F64)  # 9.0 is padding
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    for aggregation, value in (("token_mean", 1 / 5), ("seq_mean_token_mean", 1 / 4)):
        logp = old.clone().requires_grad_()
        loss, metrics = HighEntropyMaskLoss(GRPOLoss(loss_aggregation=aggregation), 0.2)(
            logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropies=ent)
        loss.backward()
        assert loss.item() == pytest.approx(value, rel=1e-12)
        expected = torch.zeros(2, 3, dtype=F64)
        expected[1, 1] = value
        torch.testing.assert_close(logp.grad, expected)
        assert metrics["entropy_mask/kept"].item() == pytest.approx(1 / 5)
        assert metrics["grad_util/token"].item() == pytest.approx(1 / 5)


def trl_masked_dapo_loop(logp, old, adv, mask, ent, rho, eps_low, eps_high):
    """TRL: threshold = torch.quantile(non-pad entropies, 1 - top_entropy_quantile), entropy_mask =
    ent >= threshold on valid tokens, per_token_loss (GRPO's clipped term) * entropy_mask, then
    loss_type "dapo": the sum over tokens divided by all valid tokens."""
    values = sorted(float(ent[i, t]) for i in range(ent.shape[0]) for t in range(ent.shape[1]) if mask[i, t])
    pos = (1 - rho) * (len(values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(values) - 1)
    threshold = values[lo] + (pos - lo) * (values[hi] - values[lo])
    total, n = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            n += 1
            if float(ent[i, t]) < threshold - 1e-12:
                continue
            a = _per_token_adv(adv, i, t)
            r = torch.exp(logp[i, t] - old[i, t])
            total = total - torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
    return total / n


def test_entropy_mask_matches_trl_loop():
    case = random_case(7, b=8, t=9, spread=0.3)
    loss_fn = HighEntropyMaskLoss(GRPOLoss(epsilon_low=0.1, epsilon_high=0.28, loss_aggregation="token_mean"), 0.3)
    loss, grad, metrics = _grad(loss_fn, case)
    logp = case["logprobs"].detach().clone().requires_grad_()
    ref = trl_masked_dapo_loop(logp, case["old_logprobs"], case["advantages"], case["mask"], case["entropies"],
                               0.3, 0.1, 0.28)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-12, atol=1e-15)
    assert 0.25 < metrics["entropy_mask/kept"].item() < 0.35


def test_entropy_mask_keeps_every_token_at_rho_one_and_narrows_kl_cov():
    case = random_case(8, b=8, t=9, spread=0.3)
    _, grad_all, _ = _grad(HighEntropyMaskLoss(SAPOLoss(), 1.0), case)
    _, grad_plain, _ = _grad(SAPOLoss(), case)
    torch.testing.assert_close(grad_all, grad_plain, rtol=1e-12, atol=1e-15)
    # KL-Cov under the mask: no gradient at all (policy or penalty) on a masked token.
    loss_fn = HighEntropyMaskLoss(KLCovLoss(kl_cov_ratio=0.3), 0.2)
    ids = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                    mask=case["mask"], entropies=case["entropies"], distributed=False)
    keep, inner = unpack(ids)
    assert (inner.bool() & ~keep).any()  # KL-Cov chose tokens the mask drops
    _, grad, _ = _grad(loss_fn, case, group_ids=ids)
    assert bool((grad[~keep] == 0).all()) and bool((grad[keep] != 0).any())


def test_pack_round_trips_espo_group_ids():
    keep = torch.tensor([[True, False, True, False]])
    ids = torch.tensor([[0, 1, 2, -1]])
    back_keep, back_ids = unpack(pack(keep, ids))
    assert torch.equal(back_keep, keep) and torch.equal(back_ids, ids)


# ----- gradient checks (float64) ---------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: SAPOLoss(tau_pos=1.5, tau_neg=0.7),
    lambda: SAPOLoss(loss_aggregation="token_mean"),
    lambda: ClipCovLoss(clip_ratio=0.2, cov_lb=0.0, cov_ub=2.0, epsilon_low=0.1, epsilon_high=0.1),
    lambda: KLCovLoss(kl_cov_ratio=0.2, kl_coef=0.5),
    lambda: KLCovLoss(kl_cov_ratio=0.2, ppo_clip=True, loss_aggregation="seq_mean_token_mean"),
    lambda: HighEntropyMaskLoss(GRPOLoss(), 0.4),
    lambda: HighEntropyMaskLoss(ClipCovLoss(clip_ratio=0.2, cov_lb=0.0), 0.5),
], ids=["sapo", "sapo-token", "clip-cov", "kl-cov", "kl-cov-clip", "mask-grpo", "mask-clip-cov"])
def test_gradcheck(make):
    """The choices are fixed first (prepare_minibatch), then torch.autograd.gradcheck in float64 away
    from the clip and |.| kinks (the log-ratios are >= 0.02 from any of them)."""
    loss_fn = make()
    case = random_case(9, b=4, t=5, spread=0.3)
    d = case["logprobs"].detach() - case["old_logprobs"]
    d = torch.where(d.abs() < 0.02, d.sign() * 0.02 + (d == 0) * 0.02, d)
    case["logprobs"] = (case["old_logprobs"] + d).requires_grad_()
    ids = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                    mask=case["mask"], entropies=case["entropies"], distributed=False)
    rest = {k: v for k, v in case.items() if k != "logprobs"}
    assert torch.autograd.gradcheck(lambda lp: loss_fn(logprobs=lp, group_ids=ids, **rest)[0],
                                    (case["logprobs"],))


# ----- micro-batches: the choice is the minibatch's ----------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: ClipCovLoss(clip_ratio=0.1, cov_lb=0.0, cov_ub=3.0),
    lambda: KLCovLoss(kl_cov_ratio=0.1),
    lambda: HighEntropyMaskLoss(GRPOLoss(loss_aggregation="token_mean"), 0.2),
    lambda: HighEntropyMaskLoss(SAPOLoss(), 0.3),
], ids=["clip-cov", "kl-cov", "mask-dapo", "mask-sapo"])
def test_micro_batches_give_the_one_pass_step(make):
    """As training_step does: prepare_minibatch over the whole minibatch, then micro-batches of 3
    rows, each loss divided by the minibatch's counts: the summed losses and gradients are the one
    pass's, and the one pass equals the loss called without precomputed choices."""
    loss_fn = make()
    case = random_case(10, b=10, t=8, spread=0.3)
    ids = loss_fn.prepare_minibatch(old_logprobs=case["old_logprobs"], advantages=case["advantages"],
                                    mask=case["mask"], entropies=case["entropies"], step=3, distributed=False)
    one_loss, one_grad, _ = _grad(loss_fn, case, group_ids=ids)
    if not isinstance(loss_fn, ClipCovLoss):  # Clip-Cov's own draw in a call uses the global generator
        bare_loss, bare_grad, _ = _grad(loss_fn, case)
        assert bare_loss.item() == pytest.approx(one_loss.item(), rel=1e-12)
        torch.testing.assert_close(bare_grad, one_grad, rtol=1e-12, atol=1e-15)
    counts = Normalizer.of(case["mask"])
    logp = case["logprobs"].detach().clone().requires_grad_()
    total = 0.0
    for rows in torch.arange(10).split(3):
        micro = {k: v[rows] for k, v in case.items() if k != "logprobs"}
        loss, _ = loss_fn(logprobs=logp[rows], group_ids=ids[rows], normalizer=counts, **micro)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(one_loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(logp.grad, one_grad, rtol=1e-12, atol=1e-15)


def test_float32_works():
    case = random_case(11)
    case32 = {k: (v.float() if v.is_floating_point() else v) for k, v in case.items()}
    case32["logprobs"] = case32["logprobs"].detach().requires_grad_()
    for loss_fn in (SAPOLoss(), ClipCovLoss(clip_ratio=0.1, cov_lb=0.0), KLCovLoss(), HighEntropyMaskLoss(GRPOLoss())):
        loss, metrics = loss_fn(**case32)
        loss.backward()
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("make, match", [
    (lambda: SAPOLoss(tau_pos=0.0), r"SAPOLoss: tau_pos must be in \(0, inf\)"),
    (lambda: SAPOLoss(loss_aggregation="sum"), "SAPOLoss: loss_aggregation must be one of"),
    (lambda: ClipCovLoss(clip_ratio=0.0), r"ClipCovLoss: clip_ratio must be in \(0, 1\]"),
    (lambda: ClipCovLoss(cov_lb=5.0, cov_ub=1.0), r"ClipCovLoss: cov_ub must be in \(5, inf\)"),
    (lambda: ClipCovLoss(selection="micro"), "ClipCovLoss: selection must be one of"),
    (lambda: KLCovLoss(kl_coef=-1.0), r"KLCovLoss: kl_coef must be in \[0, inf\)"),
    (lambda: HighEntropyMaskLoss(GRPOLoss(), 0.0), r"top_entropy_quantile must be in \(0, 1\]"),
    (lambda: HighEntropyMaskLoss(HighEntropyMaskLoss(GRPOLoss())), "not another mask"),
])
def test_bad_values_name_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_no_valid_token_gives_zero_loss_and_finite_metrics():
    case = random_case(12)
    case["mask"] = torch.zeros_like(case["mask"])
    for loss_fn in (SAPOLoss(), ClipCovLoss(), KLCovLoss(), HighEntropyMaskLoss(GRPOLoss())):
        loss, grad, metrics = _grad(loss_fn, case)
        assert loss.item() == 0 and bool((grad == 0).all())
        assert all(torch.isfinite(v) for v in metrics.values())
