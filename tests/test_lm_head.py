"""The fused LM head against the logits path: the same log-probs, entropies and gradients (tied and
untied heads, a head bias, temperature, bf16 autocast), a hand-checked gradient in float64, and the
fallback for heads it cannot reach."""
from __future__ import annotations

import logging

import pytest
import torch

from espo_lightning.policy.lm_head import HeadNotReached, _FusedHeadLogprobs, fused_completion_stats, fusion_blocker
from espo_lightning.rollout.tensors import build_rollout_batch
from espo_lightning.policy.scoring import TokenScorer, position_ids, sequence_logprobs, sequence_logprobs_and_entropy


def _model(tie: bool, vocab: int = 97, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return Qwen2ForCausalLM(config).float().train()


def _batch(vocab: int, temperature: float = 1.0):
    gen = torch.Generator().manual_seed(1)
    prompts = [[int(x) for x in torch.randint(2, vocab, (n,), generator=gen)] for n in (3, 5, 2, 4)]
    completions = [[int(x) for x in torch.randint(2, vocab, (n,), generator=gen)] for n in (6, 1, 4, 0)]
    return build_rollout_batch(prompts, completions, 0, torch.zeros(4), torch.zeros(4), None, temperature)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_equals_logits_path_values_and_gradients(tie, temperature):
    model = _model(tie)
    batch = _batch(model.config.vocab_size, temperature)
    mask, lc = batch.completion_mask, batch.completion_mask.shape[1]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask

    ref = sequence_logprobs(model, batch.input_ids, batch.attention_mask, lc, temperature, chunk_size=3)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()
    fused, _ = fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                      position_ids(batch.attention_mask), mask, temperature, 2, with_entropy=False)
    (fused * weights).sum().backward()
    grads = _grads(model)

    torch.testing.assert_close(fused[mask], ref[mask], atol=1e-6, rtol=0)
    assert (fused[~mask] == 0).all()
    assert grads.keys() == ref_grads.keys()
    # the head's weight gets its gradient from the fused head: its own parameter when untied, the
    # embedding's (named once, as model.embed_tokens.weight) when tied
    assert ("lm_head.weight" in grads) == (not tie) and "model.embed_tokens.weight" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    with torch.no_grad():
        lp, ent = fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                         position_ids(batch.attention_mask), mask, temperature, 2, with_entropy=True)
        ref_lp, ref_ent = sequence_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, lc,
                                                        temperature, 3, 4)
    assert torch.equal(lp, fused.detach())  # scoring and the training pass: bit-identical
    torch.testing.assert_close(ent[mask], ref_ent[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(lp[mask], ref_lp[mask], atol=1e-6, rtol=0)


def test_fused_gradient_by_hand_in_float64_with_bias():
    """logp = log_softmax((h W^T + b) / tau)[y]; d logp / d z = (onehot(y) - p) / tau with z the
    logits, so dL/dh = sum_n g_n (onehot - p_n) W / tau, dL/dW = sum_n g_n (onehot - p_n)^T h_n / tau,
    dL/db = sum_n g_n (onehot - p_n) / tau: checked against autograd on the plain expression, and
    with torch.autograd.gradcheck, chunks of 2 rows over 5 rows (a partial last chunk)."""
    gen = torch.Generator().manual_seed(0)
    N, H, V, tau = 5, 4, 11, 0.8
    h = torch.randn(N, H, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randint(V, (N,), generator=gen)
    g = torch.randn(N, dtype=torch.float64, generator=gen)

    out = _FusedHeadLogprobs.apply(h, w, b, y, tau, 2, False)[0]
    grads = torch.autograd.grad((out * g).sum(), (h, w, b))
    z = (h @ w.T + b) / tau
    ref = z.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    p = z.softmax(-1).detach()
    d = (torch.nn.functional.one_hot(y, V) - p) * g.unsqueeze(-1) / tau  # [N, V]
    for got, want in zip(grads, (d @ w.detach(), d.T @ h.detach(), d.sum(0))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda h_, w_, b_: _FusedHeadLogprobs.apply(h_, w_, b_, y, tau, 2, False)[0],
                                    (h, w, b))


def test_bf16_autocast_matches_the_logits_path_under_autocast():
    model = _model(tie=False)
    batch = _batch(model.config.vocab_size)
    mask, lc = batch.completion_mask, batch.completion_mask.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sequence_logprobs(model, batch.input_ids, batch.attention_mask, lc, 1.0, chunk_size=4)
        fused, _ = fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                          position_ids(batch.attention_mask), mask, 1.0, 4, with_entropy=False)
    # the same bf16 logits, fp32 statistics: equal up to the order of the bf16 GEMM's reductions
    torch.testing.assert_close(fused[mask], ref[mask], atol=2e-2, rtol=0)
    fused.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()


def test_heads_that_cannot_be_fused_fall_back_with_one_log_line(caplog):
    model = _model(tie=False)
    assert fusion_blocker(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fusion_blocker(model)
    batch = _batch(model.config.vocab_size)
    scorer = TokenScorer(chunk_size=4)
    with caplog.at_level(logging.WARNING, logger="espo_lightning.policy.scoring"):
        first = scorer.logprobs(model, batch)
        scorer.logprobs(model, batch)
    assert sum("fused LM head off" in r.message for r in caplog.records) == 1
    lc = batch.completion_mask.shape[1]
    ref = sequence_logprobs(model, batch.input_ids, batch.attention_mask, lc, 1.0, chunk_size=4)
    assert torch.equal(first, ref)


def test_a_model_that_transforms_the_head_output_is_caught_at_run_time():
    """A head that passes the static checks but whose model rescales the logits (as Granite's
    logits_scaling would, under another name): the swapped head's output does not come back
    unchanged, so the scorer refuses it and uses the logits path, which is then right."""
    model = _model(tie=False)
    original = model.forward

    def scaled_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits / 2.0
        return out

    model.forward = scaled_forward
    batch = _batch(model.config.vocab_size)
    with pytest.raises(HeadNotReached):
        fused_completion_stats(model, batch.input_ids, batch.attention_mask, position_ids(batch.attention_mask),
                               batch.completion_mask, 1.0, 4, with_entropy=False)
    assert "forward" not in model.lm_head.__dict__  # the head's own forward is restored
    lp = TokenScorer(chunk_size=4).logprobs(model, batch)
    lc = batch.completion_mask.shape[1]
    torch.testing.assert_close(lp, sequence_logprobs(model, batch.input_ids, batch.attention_mask, lc, 1.0, 4))


def test_fused_head_at_qwen_vocabulary_size_on_long_sequences():
    """V = 151,936 and a 1,500-token completion: the fused path's log-probs and entropies agree with the
    logits path, and no [T, V] tensor is kept for the backward (the saved tensors are the hidden
    states, the weight and the targets)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1)
    model = Qwen2ForCausalLM(config).float().train()
    gen = torch.Generator().manual_seed(4)
    completion = [int(x) for x in torch.randint(2, 151_936, (1500,), generator=gen)]
    batch = build_rollout_batch([[5, 6, 7]], [completion], 0, torch.zeros(1), torch.zeros(1), None, 1.0)
    mask = batch.completion_mask
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused, _ = fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                          position_ids(batch.attention_mask), mask, 1.0, 256, with_entropy=False)
    assert not any(151_936 in shape and len(shape) >= 2 and shape[0] * shape[-1] > 151_936 * 16 for shape in saved)
    fused.sum().backward()
    with torch.no_grad():
        lp, ent = fused_completion_stats(model, batch.input_ids, batch.attention_mask,
                                         position_ids(batch.attention_mask), mask, 1.0, 256, with_entropy=True)
        ref_lp, ref_ent = sequence_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, 1500, 1.0,
                                                        256, 1)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert (ent > 11.0).all()  # a random head: close to log(151,936) = 11.93 nats
