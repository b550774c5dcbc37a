"""Padding-free forwards (``model.packing``): the layout, the token budget, and exactness against the
padded passes. Packing changes only speed and memory: log-probs, entropies, losses and gradients
equal the padded path's (float64 within 1e-10, float32 within 1e-5) for ESPO, GRPO, DAPO and GSPO on
Qwen2- and Qwen3-shaped models, with and without the fused head, with micro-batches and a token
budget; the on-policy ratio of a real fit stays exactly 1; models that cannot take packed rows are
refused in one line."""
from __future__ import annotations

import copy

import pytest
import torch

from espo_lightning.errors import ConfigError
from espo_lightning.losses import ESPOLoss, GRPOLoss, GSPOLoss
from espo_lightning.losses.base import Normalizer
from espo_lightning.policy.packing import PACKED_SDPA, pack, packing_blocker, prepare_for_packing
from espo_lightning.policy.scoring import TokenScorer
from espo_lightning.rollout.tensors import build_rollout_batch
from espo_lightning.training.micro_batches import plan_micro_batches
from test_distributed_parity import _check_parity, parity_runs  # noqa: F401 (a fixture)

VOCAB = 97
LOSSES = {
    "espo": lambda: ESPOLoss(vocab_size=VOCAB),
    "grpo": lambda: GRPOLoss(),
    "dapo": lambda: GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean"),
    "gspo": lambda: GSPOLoss(),
}


def _model(kind: str, dtype=torch.float64, attn: str = "sdpa", tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                 attn_implementation=attn)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **shape)).to(dtype).train()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).to(dtype).train()


def _batch(temperature: float = 0.8):
    """Nine responses: prompts of 1-6 tokens, completions of 0-9 tokens (one empty)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [[int(x) for x in torch.randint(2, VOCAB, (n,), generator=gen)] for n in (3, 5, 2, 4, 6, 1, 3, 2, 4)]
    completions = [[int(x) for x in torch.randint(2, VOCAB, (n,), generator=gen)] for n in (6, 1, 4, 0, 9, 3, 7, 2, 5)]
    advantages = torch.randn(9, generator=gen)
    return build_rollout_batch(prompts, completions, 0, advantages, torch.zeros(9), None, temperature)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----- the layout and the plan ------------------------------------------------------------------
def test_pack_lays_rows_end_to_end_with_positions_restarting():
    """Row 0: prompt [5, 6] (left padded by 1), completion [7, 8, 9]; row 1: prompt [4, 3, 2],
    completion [1] (right padded by 2). Packed: 5 6 7 8 9 | 4 3 2 1, positions 0..4 | 0..3. Row 0's
    completion tokens 7, 8, 9 are predicted by packed positions 1, 2, 3; row 1's token 1 by 7."""
    batch = build_rollout_batch([[5, 6], [4, 3, 2]], [[7, 8, 9], [1]], 0, torch.zeros(2), torch.zeros(2), None, 1.0)
    p = pack(batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert p.cu_seq_lens.tolist() == [0, 5, 9] and p.max_length == 5
    assert p.keep.tolist() == [1, 2, 3, 7] and p.targets.tolist() == [7, 8, 9, 1]
    assert [w.tolist() for w in p.where] == [[0, 0, 0, 1], [0, 1, 2, 0]]


def test_packed_budget_counts_real_tokens():
    """Totals (prompt + completion) 8, 10, 3, 7, 5; longest first: rows 1, 0, 3, 4, 2. Budget 20 real
    tokens: [1, 0] = 18 (+7 = 25 > 20), [3, 4, 2] = 15. The padded plan with the same budget counts
    rows x width: [1] (10; 2 x 12 = 24 > 20), [0, 3] (2 x 8), [4, 2] (2 x 5)."""
    prompts, completions = torch.tensor([3, 1, 2, 2, 1]), torch.tensor([5, 9, 1, 5, 4])
    packed = plan_micro_batches(prompts, completions, None, 20, packed=True)
    assert [p.tolist() for p in packed] == [[1, 0], [3, 4, 2]]
    padded = plan_micro_batches(prompts, completions, None, 20)
    assert [p.tolist() for p in padded] == [[1], [0, 3], [4, 2]]
    assert [p.tolist() for p in plan_micro_batches(prompts, completions, 2, 20, packed=True)] == [[1, 0], [3, 4], [2]]


# ----- scoring: log-probs, entropies and their gradients ---------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("fused", [True, False])
def test_packed_scoring_equals_padded_in_float64(kind, fused):
    padded_model, packed_model = _model(kind), _model(kind)
    batch = _batch()
    mask = batch.completion_mask
    padded, packed = TokenScorer(3, fused_head=fused), TokenScorer(3, fused_head=fused, packing=True)
    lp, ent = padded.logprobs_with_entropy(padded_model, batch)
    lq, eq = packed.logprobs_with_entropy(packed_model, batch)
    assert packed_model.config._attn_implementation == PACKED_SDPA
    torch.testing.assert_close(lq[mask], lp[mask], atol=1e-10, rtol=0)
    torch.testing.assert_close(eq[mask], ent[mask], atol=1e-10, rtol=0)
    assert (lq[~mask] == 0).all() and (eq[~mask] == 0).all()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=lp.dtype) * mask
    (lp * weights).sum().backward()
    (lq * weights).sum().backward()
    want, got = _grads(padded_model), _grads(packed_model)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=0, msg=name)
    with torch.no_grad():  # old-policy scoring and the first on-policy pass: bit-identical
        l_old, e_old = packed.logprobs_and_entropy(packed_model, batch)
    assert torch.equal(l_old, lq.detach()) and torch.equal(e_old, eq)


def test_packed_scoring_float32_eager_and_checkpointing():
    """float32 within 1e-5; transformers' own packed mask (eager); gradient checkpointing, whose
    recompute must see the row boundaries again."""
    batch = _batch()
    mask = batch.completion_mask
    padded_model = _model("qwen3", torch.float32)
    lp = TokenScorer(4).logprobs(padded_model, batch)
    lp.sum().backward()
    want = _grads(padded_model)
    for attn, checkpointing in (("sdpa", True), ("eager", False)):
        model = _model("qwen3", torch.float32, attn=attn)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lq = TokenScorer(4, packing=True).logprobs(model, batch)
        torch.testing.assert_close(lq[mask], lp[mask], atol=1e-5, rtol=0)
        lq.sum().backward()
        got = _grads(model)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=(attn, name))


def test_a_micro_batch_without_valid_tokens_packs():
    """The padding pass of a rank with fewer micro-batches (``PolicyModule._equalised``)."""
    batch = _batch()
    batch.completion_mask = torch.zeros_like(batch.completion_mask)
    model = _model("qwen2")
    for fused in (True, False):
        lq = TokenScorer(fused_head=fused, packing=True).logprobs(model, batch)
        assert lq.shape == batch.completion_mask.shape and (lq == 0).all()
        lq.sum().backward()


# ----- the losses over micro-batches ------------------------------------------------------------
def _step(model, scorer, loss_fn, batch, plan):
    """What ``training_step`` does: each micro-batch's loss with the minibatch's counts, gradients
    accumulated. Returns the summed loss and the gradients."""
    counts = Normalizer(*Normalizer.of(batch.completion_mask))
    total = 0.0
    model.zero_grad()
    for rows in plan:
        micro = batch.select(rows).trimmed()
        logp = scorer.logprobs(model, micro)
        loss, _ = loss_fn(logprobs=logp, old_logprobs=micro.old_logprobs, advantages=micro.advantages,
                          mask=micro.completion_mask, entropies=micro.entropies, group_ids=micro.group_ids,
                          normalizer=counts)
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("kind,fused", [("qwen2", True), ("qwen3", False), ("qwen3", True)])
def test_losses_and_gradients_packed_equal_padded(name, kind, fused):
    """One padded pass over the minibatch against packed micro-batches under a 20-token budget (and a
    count limit of 3): same loss, same gradient (float64: 1e-10 on the fused head, whose log-probs
    are float64; the logits path returns float32 log-probs by contract, so its losses agree to float32
    rounding, 1e-6)."""
    tol = 1e-10 if fused else 1e-6
    loss_fn = LOSSES[name]()
    model = _model(kind)
    batch = _batch()
    batch.old_logprobs, batch.entropies = (t.detach() for t in TokenScorer(fused_head=fused)
                                           .logprobs_with_entropy(model, batch))
    gen = torch.Generator().manual_seed(4)
    batch.old_logprobs = batch.old_logprobs + 0.05 * torch.randn(batch.old_logprobs.shape, generator=gen)
    batch.group_ids = loss_fn.prepare(batch.entropies, batch.completion_mask)
    lengths = batch.attention_mask.sum(-1)
    completion = batch.completion_mask.sum(-1)
    one, one_grads = _step(model, TokenScorer(fused_head=fused), loss_fn, batch, [torch.arange(len(batch))])
    plan = plan_micro_batches(lengths - completion, completion, 3, 20, packed=True)
    assert len(plan) >= 4
    packed, packed_grads = _step(model, TokenScorer(fused_head=fused, packing=True), loss_fn, batch, plan)
    assert abs(one) > 1e-4 and abs(packed - one) < tol
    for n in one_grads:
        torch.testing.assert_close(packed_grads[n], one_grads[n], atol=tol, rtol=0, msg=n)


# ----- through the module: a real step, the on-policy ratio, the refusal -----------------------------
@pytest.mark.slow
def test_training_step_packed_equals_padded(tiny_model_dir):
    """Two SGD steps on a scored minibatch (as tests/test_micro_batches.py): packed with a token
    budget gives the padded run's weights and metrics."""
    from test_micro_batches import _scored_batch, _train

    batch = _scored_batch(tiny_model_dir)
    one, one_metrics = _train(tiny_model_dir, batch)
    for kwargs in ({"packing": True}, {"packing": True, "max_tokens_per_micro_batch": 30, "fused_lm_head": False}):
        weights, metrics = _train(tiny_model_dir, batch, **kwargs)
        assert max(float((weights[k] - one[k]).abs().max()) for k in one) < 1e-6, kwargs
        for got, want in zip(metrics, one_metrics):
            assert all(abs(got[k] - want[k]) < 1e-5 for k in want), kwargs


@pytest.mark.slow
def test_on_policy_ratio_is_exactly_one_packed(tiny_model_dir):
    """A real fit (rollouts, scoring, two updates per rollout) with packing: the first update of each
    rollout sees ratio 1 and clips nothing."""
    from test_on_policy_ratio import _assert_on_policy, _fit

    _, steps = _fit(tiny_model_dir, "32-true", packing=True)
    _assert_on_policy(steps)
    assert all(s["clip_total"] == 0 for s in steps)


class _CustomCode(torch.nn.Module):
    """Stands for a ``trust_remote_code`` model: a class outside ``transformers.models``."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "sdpa", "_name_or_path": "org/custom"})()


def test_models_that_cannot_take_packed_rows_are_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        prepare_for_packing(_CustomCode(), "policy")
    message = str(err.value)
    assert "\n" not in message and "model.packing" in message and "org/custom" in message
    assert "custom-code" in message
    model = _model("qwen2", torch.float32)
    model.config._attn_implementation = "paged|sdpa"
    assert "attention implementation 'paged|sdpa'" in packing_blocker(model)
    with pytest.raises(ConfigError, match="model.packing"):
        TokenScorer(packing=True).logprobs(model, _batch())
    windowed = _model("qwen2", torch.float32)
    windowed.config.layer_types = ["sliding_attention", "full_attention"]
    assert "windowed" in packing_blocker(windowed)
    assert packing_blocker(_model("qwen3", torch.float32, attn="eager")) is None


def test_packing_is_refused_when_the_module_loads_the_model(tiny_model_dir, monkeypatch):
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(tiny_model_dir, packing=True, attn_implementation="sdpa")
    module.configure_model()
    assert module.policy.config._attn_implementation == PACKED_SDPA
    import espo_lightning.policy.packing as packing

    monkeypatch.setattr(packing, "SUPPORTED", ())
    with pytest.raises(ConfigError, match=r"model.packing: the policy .*addition-tiny"):
        PolicyModule(tiny_model_dir, packing=True).configure_model()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_packed_match_one_padded_process(parity_runs):
    """FSDP2 on 2 gloo ranks (gradient checkpointing on, a reduce-scatter per micro-batch, a real-token
    budget that gives the ranks different numbers of packed passes) takes the single padded process's
    two steps (tests/test_distributed_parity.py's check, 1e-5)."""
    _check_parity(parity_runs, "fsdp", packing=True, max_tokens_per_micro_batch=40, defer_grad_sync=False)


def test_benchmark_trl_head_scores_every_position_to_the_same_log_probs():
    """benchmarks/packing.py's TRL side (every position of the rectangle through the head, as TRL's
    fused head does off Triton devices) computes the same numbers as the scorer, only more work."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "packing.py"
    spec = importlib.util.spec_from_file_location("packing_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, batch = _model("qwen3"), _batch()
    mask = batch.completion_mask
    lp, ent = TokenScorer(3).logprobs_with_entropy(model, batch)
    lt, et = bench.trl_head_logprobs(model, batch, 3, True)
    torch.testing.assert_close(lt[mask], lp[mask], atol=1e-10, rtol=0)
    torch.testing.assert_close(et[mask], ent[mask], atol=1e-10, rtol=0)
    assert (lt[~mask] == 0).all() and (et[~mask] == 0).all()
