"""Running one validation step: a chunk of one set's problems, generated, scored, and summarised.

Sharding. A set's problems are dealt to ranks by position (problem i to rank i % world); every rank
runs the same number of steps (sharded generation is a collective), so a rank short of problems
repeats problem 0 with weight 0, which is generated but neither scored nor counted.

Sampling. Greedy sets decode each chunk in one batched ``generate``. The k samples of a problem
are drawn from the problem's own seed (``sets.problem_seed``), so they do not depend on which rank
or chunk the problem lands in, nor on the evaluation round: an engine that honours per-prompt seeds
(``RolloutEngine.per_prompt_seeds``: vLLM, one batched call with n = k) gets the whole chunk at
once; any other engine (transformers ``generate``, whose random draws depend on the batch) is
called once per problem with that problem's seed, its k samples sharing one prefill."""
from __future__ import annotations

import math
from dataclasses import dataclass

from espo_lightning.evaluation.metrics import ProblemResult
from espo_lightning.evaluation.sets import EvalSpec, problem_seed
from espo_lightning.engines.base import Generation
from espo_lightning.data.prompts import completions_for_rewards


@dataclass
class EvalChunk:
    """One validation step: problems of one set (weight 0: padding)."""

    set_name: str
    rows: list[dict]
    indices: list[int]  # positions in the set
    weights: list[float]


@dataclass
class ChunkOutput:
    results: list[ProblemResult]  # one per problem of the chunk, padding included (weight 0)
    samples: list[dict]  # one per completion of the chunk's real problems


def shard(spec: EvalSpec, rows: list[dict], rank: int, world: int, batch_size: int) -> list[EvalChunk]:
    """This rank's problems of the set in chunks of ``batch_size``, padded with weight-0 repeats of
    problem 0 to the same number of problems on every rank."""
    per_rank = math.ceil(len(rows) / world)
    mine = list(range(rank, len(rows), world))
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    return [EvalChunk(spec.name, [rows[i] for i in mine[s:s + batch_size]], mine[s:s + batch_size],
                      weights[s:s + batch_size]) for s in range(0, per_rank, batch_size)]


def generate(spec: EvalSpec, chunk: EvalChunk, prompt_ids: list[list[int]], *, engine, policy, seed: int) -> Generation:
    """The chunk's completions, problem-major (``n`` per problem: 1 greedy, k sampled)."""
    if spec.greedy:
        return engine.generate(prompt_ids, spec.sampling(), policy)
    seeds = tuple(problem_seed(seed, spec.name, i) for i in chunk.indices)
    if getattr(engine, "per_prompt_seeds", False):
        return engine.generate(prompt_ids, spec.sampling(seeds=seeds), policy)
    parts = [engine.generate([ids], spec.sampling(seed=s), policy) for ids, s in zip(prompt_ids, seeds)]
    return Generation([t for g in parts for t in g.token_ids], [t for g in parts for t in g.truncated])


def run_chunk(spec: EvalSpec, chunk: EvalChunk, *, encoder, engine, policy, tokenizer, rewarder, precision_context,
              seed: int) -> ChunkOutput:
    n = 1 if spec.greedy else spec.k
    prompts = [r["prompt"] for r in chunk.rows]
    with precision_context():  # as the rollout generates
        gen = generate(spec, chunk, encoder.encode(prompts).ids, engine=engine, policy=policy, seed=seed)
    real = [p for p, w in enumerate(chunk.weights) if w > 0]  # padding is generated (collective), not scored
    flat = [p * n + j for p in real for j in range(n)]
    rows = [chunk.rows[p] for p in real for _ in range(n)]
    token_ids = [gen.token_ids[i] for i in flat]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True) if token_ids else []
    completions = completions_for_rewards([r["prompt"] for r in rows], texts)
    scored = None
    if rows:
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = token_ids
        scored = rewarder.score([r["prompt"] for r in rows], completions, columns)
    samples = [{"set": spec.name, "index": chunk.indices[i // n], "sample": i % n, "prompt": rows[s]["prompt"],
                "completion": texts[s], "reward": scored.total[s], "correct": scored.correct[s] >= 1.0,
                "length": len(gen.token_ids[i]), "truncated": bool(gen.truncated[i])} for s, i in enumerate(flat)]
    correct = {}  # problem position -> correct completions
    for sample, i in zip(samples, flat):
        correct[i // n] = correct.get(i // n, 0) + int(sample["correct"])
    results = [ProblemResult(spec.name, index, weight, n, correct.get(p, 0),
                             sum(len(t) for t in gen.token_ids[p * n:(p + 1) * n]),
                             sum(bool(t) for t in gen.truncated[p * n:(p + 1) * n]))
               for p, (index, weight) in enumerate(zip(chunk.indices, chunk.weights))]
    return ChunkOutput(results, samples)
