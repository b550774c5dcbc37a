"""Evaluation the way papers report it, beside the rollout: several named sets per run, each greedy
or with k samples per problem, logged as ``val/<set>/accuracy``, ``avg@k``, the unbiased ``pass@k``,
``response_len_mean`` and ``truncated_frac`` (a single source is the set ``val``: ``val/accuracy``).

- ``sets``: ``EvalSet`` (the config of one set) resolved into ``EvalSpec``; per-problem seeds;
- ``runner``: sharding a set over ranks and running one validation step on the rollout engine;
- ``metrics``: pass@k and the set metrics from per-problem results gathered over ranks;
- ``writer``: the summary JSON, the sample JSONL files and the TensorBoard text;
- ``evaluator``: ``Evaluator``, which the DataModule holds and the module's validation hooks drive;
- ``report``: the table ``validate`` prints at its end.
"""
from espo_lightning.evaluation.evaluator import Evaluator
from espo_lightning.evaluation.metrics import ProblemResult, pass_at_k, set_metrics
from espo_lightning.evaluation.sets import EvalSet, EvalSpec, problem_seed, resolve_sets

__all__ = ["EvalSet", "EvalSpec", "Evaluator", "ProblemResult", "pass_at_k", "problem_seed", "resolve_sets",
           "set_metrics"]
