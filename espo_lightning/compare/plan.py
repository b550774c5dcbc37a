"""What a comparison runs: ``conf/compare.yaml`` read and checked, and one ``Run`` per (method, seed).

A comparison is a base config, named methods (each a list of overlay configs composed on top of the
base, as ``--config base --config overlay`` would), seeds, and CLI overrides applied to every run.
Every run is an ordinary ``python -m espo_lightning fit`` in its own folder ``OUT/runs/METHOD/seedS``."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from espo_lightning.errors import ConfigError

KEYS = {"base", "methods", "seeds", "overrides", "target_accuracy", "smooth", "espo_method", "gspo_method",
        "reference_method", "paper_claims"}


@dataclass
class ComparePlan:
    """A parsed ``compare.yaml`` (see ``conf/compare.yaml`` for every key)."""

    base: list[str]
    methods: dict[str, list[str]]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    target_accuracy: float = 0.5
    smooth: float = 0.6
    espo_method: str = "ESPO"
    gspo_method: str = "GSPO"
    reference_method: str | None = None  # the report says whether each other method's final accuracy held against it
    paper_claims: bool = True  # the report's section on the ESPO paper's three claims
    source: str = ""

    def runs(self, out: Path) -> list["Run"]:
        return [Run(method, seed, out / "runs" / method / f"seed{seed}", self.command(method, seed, out))
                for method in self.methods for seed in self.seeds]

    def command(self, method: str, seed: int, out: Path) -> list[str]:
        configs = [arg for path in self.base + self.methods[method] for arg in ("--config", path)]
        # data.seed drives prompt order and sampling; seed_everything the rest (initialisation, dropout)
        return [sys.executable, "-m", "espo_lightning", "fit", *configs, f"--seed_everything={seed}", f"--data.seed={seed}",
                f"--trainer.default_root_dir={out / 'runs' / method / f'seed{seed}'}", *self.overrides]


@dataclass
class Run:
    method: str
    seed: int
    folder: Path
    command: list[str]


def _as_list(value, key: str, where: str) -> list[str]:
    value = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a config path or a list of them, got {value!r}")
    return value


def load_plan(path: str | Path) -> ComparePlan:
    """Read and check a comparison file; every mistake is one line naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {sorted(KEYS)}")
    unknown = set(raw) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    for key in ("base", "methods", "seeds"):
        if key not in raw:
            raise ConfigError(f"{path}: '{key}' is required")
    base = _as_list(raw["base"], "base", str(path))
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: 'methods' must map method names to overlay configs (an empty list: the base as is)")
    methods = {str(name): _as_list(overlays, f"methods.{name}", str(path)) for name, overlays in methods.items()}
    bad = [name for name in methods if not name or "/" in name or name.startswith(".")]
    if bad:
        raise ConfigError(f"{path}: method names become folder names; {bad} cannot")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and o.startswith("--") for o in overrides):
        raise ConfigError(f"{path}: 'overrides' must be a list of CLI arguments such as '--trainer.max_epochs=40'")
    for config in base + [c for overlays in methods.values() for c in overlays]:
        if not Path(config).is_file():
            raise ConfigError(f"{path}: config file {config} does not exist (paths are relative to the working directory)")
    plan = ComparePlan(base=base, methods=methods, seeds=seeds, overrides=overrides, source=str(path))
    for key in ("target_accuracy", "smooth"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, (int, float)) or not (0 <= value <= 1 if key == "target_accuracy" else 0 <= value < 1):
                raise ConfigError(f"{path}: '{key}' must be a number in {'[0, 1]' if key == 'target_accuracy' else '[0, 1)'}, got {value!r}")
            setattr(plan, key, float(value))
    for key in ("espo_method", "gspo_method"):
        if key in raw:
            setattr(plan, key, str(raw[key]))
    reference = raw.get("reference_method")
    if reference is not None and str(reference) not in methods:
        raise ConfigError(f"{path}: 'reference_method' must name one of the methods {sorted(methods)}, got {reference!r}")
    plan.reference_method = None if reference is None else str(reference)
    claims = raw.get("paper_claims", True)
    if not isinstance(claims, bool):
        raise ConfigError(f"{path}: 'paper_claims' must be true or false, got {claims!r}")
    plan.paper_claims = claims
    return plan
