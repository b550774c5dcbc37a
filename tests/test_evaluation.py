"""Evaluation sets (``espo_lightning.evaluation``): the unbiased pass@k and avg@k on hand-computed
cases, the set settings and their errors, sharding with weight-0 padding, which ``generate`` calls
each kind of engine gets, and samples that do not depend on the rank layout (real tiny model)."""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from espo_lightning.errors import ConfigError
from espo_lightning.evaluation import EvalSet, ProblemResult, pass_at_k, problem_seed, resolve_sets, set_metrics
from espo_lightning.evaluation.runner import run_chunk, shard
from espo_lightning.engines.base import Generation, RolloutEngine
from espo_lightning.rollout.rewarding import Rewarder
from espo_lightning.tasks.addition import AdditionSource

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = dict(temperature=0.7, top_p=0.95, max_new_tokens=8)


# ----- pass@k and avg@k --------------------------------------------------------------------------
@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2): of the 6 pairs, the 3 without the correct sample fail
    (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2): only the pair of the two wrong samples fails
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
    (5, 3, 3, 1.0),  # n - c = 2 < k: every 3-subset holds a correct sample
    (4, 0, 2, 0.0),  # nothing correct
    (4, 4, 4, 1.0),
    (32, 5, 1, 5 / 32),  # pass@1 = c / n
    (32, 1, 8, 1 - 24 / 32),  # C(31,8)/C(32,8) = (32-8)/32
    (32, 2, 16, 1 - (16 * 15) / (32 * 31)),  # C(30,16)/C(32,16) = (16*15)/(32*31)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    """pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without
    replacement, include a correct one (the Codex paper's unbiased estimator)."""
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_product_form_equals_the_binomials():
    for n in range(1, 40):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert pass_at_k(1024, 3, 512) == pytest.approx(1 - math.comb(1021, 512) / math.comb(1024, 512), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def _spec(**settings):
    return resolve_sets({"s": EvalSet(source=AdditionSource(3), **settings)}, **DEFAULTS)[0]


def test_sampled_set_metrics_by_hand():
    """k = 4; three problems with 0, 1 and 4 correct samples, and one weight-0 padding repeat.
    avg@4 = (0 + 1 + 4) / 12 = 5/12 (mean over the 12 samples); pass@1 is the same number;
    pass@2 = mean(0, 1 - C(3,2)/C(4,2) = 1/2, 1) = 1/2; pass@4 = mean(0, 1, 1) = 2/3;
    response length = (8 + 12 + 4) / 12 = 2; truncated = (0 + 2 + 1) / 12 = 1/4."""
    spec = _spec(k=4, pass_at_k=[1, 2, 4])
    results = [ProblemResult("s", 2, 1.0, 4, 4, 4, 1), ProblemResult("s", 0, 1.0, 4, 0, 8, 0),
               ProblemResult("s", 1, 1.0, 4, 1, 12, 2), ProblemResult("s", 0, 0.0, 4, 4, 99, 4)]
    assert set_metrics(spec, results) == pytest.approx({
        "val/s/avg@4": 5 / 12, "val/s/pass@1": 5 / 12, "val/s/pass@2": 0.5, "val/s/pass@4": 2 / 3,
        "val/s/response_len_mean": 2.0, "val/s/truncated_frac": 0.25})
    samples = [0] * 4 + [1, 0, 0, 0] + [1] * 4  # avg@k is the plain mean of per-sample correctness
    assert set_metrics(spec, results)["val/s/avg@4"] == pytest.approx(sum(samples) / len(samples))


def test_greedy_set_and_the_single_source_names():
    results = [ProblemResult("val", i, 1.0, 1, c, 3, 0) for i, c in enumerate([1, 0, 1, 1, 0])]
    spec = resolve_sets(AdditionSource(5), **DEFAULTS)[0]  # one source: the set "val", as before
    assert (spec.name, spec.greedy, spec.headline) == ("val", True, "val/accuracy")
    assert set_metrics(spec, results) == pytest.approx(
        {"val/accuracy": 0.6, "val/response_len_mean": 3.0, "val/truncated_frac": 0.0})


# ----- settings and their errors -----------------------------------------------------------------
def test_set_defaults_and_overrides():
    sets = resolve_sets({"math500": AdditionSource(3), "aime24": {"source": AdditionSource(3), "k": 32},
                         "hot": EvalSet(source=AdditionSource(3), k=4, temperature=1.2, max_new_tokens=3,
                                        pass_at_k=[4, 1, 1])}, **DEFAULTS)
    math500, aime, hot = sets
    assert (math500.greedy, math500.k, math500.max_new_tokens, math500.headline) == (True, 1, 8, "val/math500/accuracy")
    assert (aime.greedy, aime.temperature, aime.top_p, aime.pass_at_k, aime.headline) == (
        False, 0.7, 0.95, (32,), "val/aime24/avg@32")
    assert (hot.temperature, hot.max_new_tokens, hot.pass_at_k) == (1.2, 3, (1, 4))
    assert _spec(k=1, greedy=False).headline == "val/s/avg@1"  # one sample per problem
    sampling = aime.sampling(seeds=(5,))
    assert (sampling.n, sampling.greedy, sampling.temperature, sampling.prompt_seeds) == (32, False, 0.7, (5,))


@pytest.mark.parametrize("settings, message", [
    (dict(k=0), "data.val_data.s.k must be an integer >= 1, got 0"),
    (dict(k=4, greedy=True), "data.val_data.s.k must be 1 with greedy decoding"),
    (dict(k=32, pass_at_k=[1, 64]), "data.val_data.s.pass_at_k entries must be integers in [1, k=32], got 64"),
    (dict(k=4, temperature=0.0), "data.val_data.s.temperature must be > 0, got 0.0"),
    (dict(k=4, top_p=1.5), "data.val_data.s.top_p must be in (0, 1], got 1.5"),
    (dict(max_new_tokens=0), "data.val_data.s.max_new_tokens must be an integer >= 1, got 0"),
    (dict(temperature=0.6), "data.val_data.s.temperature applies to sampled sets only"),
    (dict(pass_at_k=[1]), "data.val_data.s.pass_at_k applies to sampled sets only"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError) as err:
        _spec(**settings)
    assert message in str(err.value)


def test_bad_names_and_values():
    with pytest.raises(ConfigError, match="data.val_data.a/b: set names are metric names"):
        resolve_sets({"a/b": AdditionSource(3)}, **DEFAULTS)
    with pytest.raises(ConfigError, match="data.val_data must be a prompt source or a non-empty mapping"):
        resolve_sets({}, **DEFAULTS)
    with pytest.raises(ConfigError, match="data.val_data.x must be a prompt source or an EvalSet"):
        resolve_sets({"x": 3}, **DEFAULTS)


def test_a_bad_set_fails_through_the_cli_with_one_line(tmp_path, capsys):
    from espo_lightning.cli import main

    sys.argv = sys.argv[:1]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "conf/eval_embedded.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--data.val_data.addition_k4.pass_at_k", "[1, 8]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1] == "error: data.val_data.addition_k4.pass_at_k entries must be integers in [1, k=4], got 8"


def test_validate_last_without_a_checkpoint_says_so(tmp_path, capsys):
    from espo_lightning.cli import main

    sys.argv = sys.argv[:1]
    with pytest.raises(SystemExit):
        main(["validate", "--config", str(REPO / "conf/eval_embedded.yaml"), "--model.model_builder", "null",
              "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --ckpt_path last: no checkpoint in {tmp_path / 'checkpoints'}")


def test_problem_seeds_depend_on_seed_set_and_index_only():
    seeds = {problem_seed(s, name, i) for s in (0, 1) for name in ("a", "b") for i in range(100)}
    assert len(seeds) == 400
    assert problem_seed(3, "aime24", 7) == problem_seed(3, "aime24", 7)
    streams = sorted(problem_seed(0, "a", i) for i in range(100))  # vLLM's sample j uses seed + j
    assert min(b - a for a, b in zip(streams, streams[1:])) >= 4096
    assert max(streams) < 2**63


# ----- sharding and the engines' calls -----------------------------------------------------------
def test_shard_pads_every_rank_to_the_same_steps():
    spec = _spec(k=2)
    rows = [{"prompt": str(i)} for i in range(7)]
    ranks = [shard(spec, rows, rank, 2, batch_size=3) for rank in (0, 1)]
    assert [[c.indices for c in chunks] for chunks in ranks] == [[[0, 2, 4], [6]], [[1, 3, 5], [0]]]
    assert ranks[1][1].weights == [0.0]  # rank 1's padding repeat
    real = sorted(i for chunks in ranks for c in chunks for i, w in zip(c.indices, c.weights) if w > 0)
    assert real == list(range(7))


class FakeEngine(RolloutEngine):
    """Records its calls; sample j of a prompt with seed s is the digit ``(s + j) % 10`` (``1``
    greedy), then EOS."""

    def __init__(self, per_prompt_seeds: bool, tok):
        self.per_prompt_seeds, self.calls = per_prompt_seeds, []
        self.digits, self.eos = [tok.convert_tokens_to_ids(str(d)) for d in range(10)], tok.eos_token_id

    def generate(self, prompt_ids, sampling, policy):
        self.calls.append((len(prompt_ids), sampling))
        seeds = sampling.prompt_seeds or [sampling.seed] * len(prompt_ids)
        tokens = [[self.digits[1 if sampling.greedy else (seeds[p] + j) % 10], self.eos]
                  for p in range(len(prompt_ids)) for j in range(sampling.n)]
        return Generation(tokens, [False] * len(tokens))


def first_digit_is_one(prompts, completions, **kwargs):
    return [1.0 if str(c).startswith("1") else 0.0 for c in completions]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _context(tok, engine, policy=None):
    from espo_lightning.data.prompts import PromptEncoder

    return dict(encoder=PromptEncoder(tok, 64), engine=engine, policy=policy, tokenizer=tok,
                rewarder=Rewarder([first_digit_is_one]), precision_context=nullcontext)


def test_engines_with_per_prompt_seeds_get_one_call_others_one_per_problem(tok):
    spec = _spec(k=4)
    rows = AdditionSource(5).rows()
    chunk = shard(spec, rows, 0, 1, batch_size=5)[0]
    seeds = tuple(problem_seed(0, "s", i) for i in range(5))
    batched, single = FakeEngine(True, tok), FakeEngine(False, tok)
    a = run_chunk(spec, chunk, seed=0, **_context(tok, batched))
    b = run_chunk(spec, chunk, seed=0, **_context(tok, single))
    assert [(n, s.n, s.prompt_seeds) for n, s in batched.calls] == [(5, 4, seeds)]  # vLLM: one call, n = k
    assert [(n, s.n, s.seed) for n, s in single.calls] == [(1, 4, seed) for seed in seeds]
    assert a.samples == b.samples and a.results == b.results
    assert len(a.samples) == 20 and [r.n for r in a.results] == [4] * 5
    assert [r.correct for r in a.results] == [sum((s + j) % 10 == 1 for j in range(4)) for s in seeds]
    greedy = FakeEngine(True, tok)
    out = run_chunk(_spec(), chunk, seed=0, **_context(tok, greedy))
    assert [(n, s.n, s.greedy) for n, s in greedy.calls] == [(5, 1, True)]
    assert [r.correct for r in out.results] == [1] * 5  # "1" then EOS: the reward's 1.0 counts


@pytest.mark.slow
def test_hf_samples_do_not_depend_on_the_rank_layout(tiny_model_dir, tok):
    """The real tiny model through HFEngine: a problem's k samples are the same whichever rank and
    chunk it lands in, so 1 rank and 2 ranks (batch 3 or 2) score the same completions."""
    from transformers import AutoModelForCausalLM

    from espo_lightning.engines import HFEngine

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = HFEngine()
    engine.setup(policy, tok)
    context = _context(tok, engine, policy)
    spec = _spec(k=4, max_new_tokens=4, temperature=1.0, pass_at_k=[1, 2, 4])
    rows = AdditionSource(7, seed=5).rows()

    def evaluate(world: int, batch: int):
        results, samples = [], []
        for rank in range(world):
            for chunk in shard(spec, rows, rank, world, batch):
                out = run_chunk(spec, chunk, seed=0, **context)
                results += out.results
                samples += out.samples
        return set_metrics(spec, results), sorted(samples, key=lambda s: (s["index"], s["sample"]))

    one_metrics, one_samples = evaluate(1, 3)
    two_metrics, two_samples = evaluate(2, 2)
    assert one_metrics == two_metrics and one_samples == two_samples
    assert len({s["completion"] for s in one_samples}) > 3, "sampled, not greedy"
