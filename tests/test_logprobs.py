"""Chunked log-probs / entropies equal the naive full-tensor computation."""
import math

import pytest
import torch

from espo_lightning.policy.logprobs import token_logprobs, token_logprobs_and_entropy


def naive(logits, targets, temperature=1.0):
    logp_all = (logits.float() / temperature).log_softmax(-1)  # [B, T, V] fp32
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def data(dtype=torch.float32, B=3, T=7, V=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    return logits, targets


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_no_grad_version_matches_naive(chunk_size, temperature):
    logits, targets = data()
    logp, entropy = token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size)
    ref_logp, ref_entropy = naive(logits, targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (3, 7)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast(dtype):
    logits, targets = data(dtype)
    logp, entropy = token_logprobs_and_entropy(logits, targets, chunk_size=5)
    ref_logp, ref_entropy = naive(logits, targets)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(token_logprobs(logits, targets, chunk_size=5), ref_logp, rtol=0, atol=1e-5)


def test_non_contiguous_logits():
    """A [:, a:b] slice of bigger logits (the completion part of prompt + completion) cannot be
    viewed as [B*T, V]; each response is chunked separately."""
    logits, targets = data(T=12)
    sliced = logits[:, 3:10]
    assert not sliced.is_contiguous()
    logp, entropy = token_logprobs_and_entropy(sliced, targets[:, :7], chunk_size=3)
    ref_logp, ref_entropy = naive(sliced, targets[:, :7])
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(token_logprobs(sliced, targets[:, :7], chunk_size=3), ref_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_grad_version_matches_naive_value_and_gradient(chunk_size, temperature):
    logits, targets = data()
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    a = logits.clone().requires_grad_()
    logp = token_logprobs(a, targets, temperature=temperature, chunk_size=chunk_size)
    (logp * weights).sum().backward()
    b = logits.clone().requires_grad_()
    ref_logp, _ = naive(b, targets, temperature)
    (ref_logp * weights).sum().backward()
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_grad_version_bf16_gradient():
    logits, targets = data(torch.bfloat16)
    a = logits.clone().requires_grad_()
    token_logprobs(a, targets, chunk_size=4).sum().backward()
    b = logits.clone().requires_grad_()
    naive(b, targets)[0].sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=1e-2)


def test_masked_vocabulary_entries():
    """-inf logits (a masked vocabulary slice) have probability 0: finite entropy, no NaN."""
    logits, targets = data(V=50)
    logits[..., 40:] = -math.inf
    targets = targets % 40
    logp, entropy = token_logprobs_and_entropy(logits, targets, chunk_size=2)
    finite = logits[..., :40]
    ref_logp, ref_entropy = naive(finite, targets)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)


def test_validation():
    logits, targets = data(V=10)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :3])
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[0], targets)
