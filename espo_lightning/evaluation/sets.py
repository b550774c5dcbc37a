"""Evaluation sets: what ``data.val_data`` names, and each set's settings resolved and checked.

``data.val_data`` is one prompt source (the set ``val``, greedy, as before) or a mapping from a set
name to a prompt source (greedy with the defaults) or to an ``EvalSet`` (a source plus its own
settings)::

    val_data:
      math500: {class_path: espo_lightning.data.sources.FilePromptSource, init_args: {path: ...}}
      aime24:
        source: {class_path: espo_lightning.data.sources.FilePromptSource, init_args: {path: ...}}
        k: 32                      # avg@32 at data.temperature
        pass_at_k: [1, 8, 32]
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from espo_lightning.data.source import PromptSource
from espo_lightning.errors import ConfigError
from espo_lightning.engines.base import Sampling

SINGLE = "val"  # the name of a set given as one source; its metrics carry no set name (val/accuracy)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class EvalSet:
    """One evaluation set under ``data.val_data.<name>``: its prompts and how they are evaluated.

    Args:
        source: The prompts (``FilePromptSource``, ``HFDatasetSource``, ``AdditionSource``, ...).
        k: Completions per problem. 1 (greedy) logs ``val/<name>/accuracy``; k > 1 samples k
            completions per problem and logs ``val/<name>/avg@k`` (mean correctness over the
            samples) and ``val/<name>/pass@k'`` for each k' of ``pass_at_k``.
        greedy: Argmax decoding; default: true when k is 1. ``greedy: false`` with ``k: 1`` samples
            one completion per problem (``avg@1``).
        temperature: Sampling temperature (sampled sets); default ``data.temperature``, the
            training temperature, as the paper evaluates.
        top_p: Nucleus sampling (sampled sets); default ``data.top_p``.
        max_new_tokens: Completion budget; default ``data.val_max_new_tokens``.
        pass_at_k: The k' <= k for which the unbiased pass@k' is logged (sampled sets); default
            ``[k]`` (pass@1 equals avg@k, so it is not repeated unless listed).
    """

    source: PromptSource
    k: int = 1
    greedy: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    pass_at_k: list[int] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """A set with every setting resolved (what the evaluator runs)."""

    name: str
    source: PromptSource
    k: int
    greedy: bool
    temperature: float
    top_p: float
    max_new_tokens: int
    pass_at_k: tuple[int, ...]
    key: str  # its config key, for messages: data.val_data.<name> (data.val_data for a single source)

    @property
    def prefix(self) -> str:
        """Metric prefix: ``val/`` for the single-source set, ``val/<name>/`` otherwise."""
        return "val/" if self.name == SINGLE else f"val/{self.name}/"

    @property
    def headline(self) -> str:
        """The set's main metric: greedy accuracy, or avg@k."""
        return self.prefix + ("accuracy" if self.greedy else f"avg@{self.k}")

    def sampling(self, seeds: tuple[int, ...] | None = None, seed: int | None = None) -> Sampling:
        if self.greedy:
            return Sampling(n=1, greedy=True, max_new_tokens=self.max_new_tokens)
        return Sampling(n=self.k, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=seed, prompt_seeds=seeds)

    def describe(self) -> dict:
        """The settings, as the summary JSON records them."""
        out = {"k": self.k, "greedy": self.greedy, "max_new_tokens": self.max_new_tokens}
        if not self.greedy:
            out.update(temperature=self.temperature, top_p=self.top_p, pass_at_k=list(self.pass_at_k))
        return out


def problem_seed(seed: int, set_name: str, index: int) -> int:
    """The sampling seed of problem ``index`` of a set: a function of ``data.seed``, the set's name
    and the problem's position only, never of the rank layout or of the evaluation round. Every
    evaluation of a run draws from the same random streams (common random numbers: differences
    between checkpoints are the model's, not the sampler's), and ``validate`` on a checkpoint or an
    exported folder reproduces the run's own evaluation of it. Problems are spaced 2**12 apart
    because vLLM gives sample j of a request the seed ``seed + j``: streams never overlap for
    k <= 4096 (and up to 2**18 problems per set)."""
    base = zlib.crc32(f"{seed}/{set_name}".encode())  # 32 bits
    return base * 2**30 + (index % 2**18) * 2**12


def resolve_sets(val_data, *, temperature: float, top_p: float, max_new_tokens: int) -> list[EvalSpec]:
    """The sets of ``data.val_data`` in config order, each checked (``ConfigError`` naming the key)."""
    if val_data is None:
        return []
    if isinstance(val_data, PromptSource):
        return [EvalSpec(SINGLE, val_data, 1, True, temperature, top_p, max_new_tokens, (), "data.val_data")]
    if not isinstance(val_data, Mapping) or not val_data:
        raise ConfigError("data.val_data must be a prompt source or a non-empty mapping of set names to prompt "
                          f"sources or EvalSet settings, got {val_data!r}")
    defaults = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return [_resolve(str(name), entry, defaults) for name, entry in val_data.items()]


def _resolve(name: str, entry, defaults: dict) -> EvalSpec:
    key = f"data.val_data.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{key}: set names are metric names: letters, digits, '_', '-' and '.' only")
    if isinstance(entry, PromptSource):
        entry = EvalSet(source=entry)
    elif isinstance(entry, Mapping):
        try:
            entry = EvalSet(**entry)
        except TypeError as err:
            raise ConfigError(f"{key}: {err}") from err
    if not isinstance(entry, EvalSet) or not isinstance(entry.source, PromptSource):
        raise ConfigError(f"{key} must be a prompt source or an EvalSet (source, k, greedy, temperature, top_p, "
                          f"max_new_tokens, pass_at_k), got {entry!r}")
    k = entry.k
    _check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"{key}.k", "must be an integer >= 1", k)
    _check(k <= 4096, f"{key}.k", "must be <= 4096 (see problem_seed)", k)
    greedy = (k == 1) if entry.greedy is None else bool(entry.greedy)
    if greedy:
        _check(k == 1, f"{key}.k", "must be 1 with greedy decoding (greedy completions are all the same); "
               "set greedy: false to sample", k)
        for field in ("temperature", "top_p", "pass_at_k"):
            _check(getattr(entry, field) in (None, []), f"{key}.{field}",
                   "applies to sampled sets only; set k > 1 or greedy: false to sample", getattr(entry, field))
    temperature = defaults["temperature"] if entry.temperature is None else entry.temperature
    top_p = defaults["top_p"] if entry.top_p is None else entry.top_p
    max_new = defaults["max_new_tokens"] if entry.max_new_tokens is None else entry.max_new_tokens
    _check(temperature > 0, f"{key}.temperature", "must be > 0", temperature)
    _check(0 < top_p <= 1, f"{key}.top_p", "must be in (0, 1]", top_p)
    _check(isinstance(max_new, int) and max_new >= 1, f"{key}.max_new_tokens", "must be an integer >= 1", max_new)
    if greedy:
        pass_at = ()
    elif entry.pass_at_k is None:
        pass_at = (k,)
    else:
        for value in entry.pass_at_k:
            _check(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= k, f"{key}.pass_at_k",
                   f"entries must be integers in [1, k={k}]", value)
        pass_at = tuple(sorted(set(entry.pass_at_k)))
    return EvalSpec(name, entry.source, k, greedy, float(temperature), float(top_p), max_new, pass_at, key)


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")
