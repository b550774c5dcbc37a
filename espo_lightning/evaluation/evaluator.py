"""``Evaluator``: the evaluation sets of a run and the evaluation in progress.

The DataModule builds it from ``data.val_data`` and hands Lightning its chunks as validation
steps; each step runs one chunk (``runner.run_chunk``) and keeps this rank's per-problem results and
a bounded number of sample completions; ``finish`` gathers the results of every rank, computes the
metrics of every set (``metrics.set_metrics``), writes the summary and the samples, and starts over."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from espo_lightning.evaluation.metrics import ProblemResult, gather_results, set_metrics
from espo_lightning.evaluation.runner import EvalChunk, run_chunk, shard
from espo_lightning.evaluation.sets import EvalSpec
from espo_lightning.evaluation import writer


class Evaluator:
    """Args:
        specs: The resolved sets (``sets.resolve_sets``).
        batch_size: Problems per validation step (one step per chunk).
        seed: ``data.seed``; the sampled sets' per-problem seeds derive from it.
        samples_per_set: Completions per set written to JSONL at each evaluation (the first
            problems' samples); 0 none, -1 all.
        text_samples: Of those, how many go to TensorBoard as text.
    """

    def __init__(self, specs: list[EvalSpec], batch_size: int, seed: int, samples_per_set: int, text_samples: int):
        self.specs = {spec.name: spec for spec in specs}
        self.batch_size, self.seed = batch_size, seed
        self.samples_per_set, self.text_samples = samples_per_set, text_samples
        self._rows: dict[str, list[dict]] = {}
        self.step = 0  # the step of the last finished evaluation
        self.last_summary: dict | None = None  # its summary (what eval_summary.json holds), every rank
        self.summary_path: Path | None = None  # where rank 0 wrote it (None elsewhere / without a log folder)
        self._reset()

    def _reset(self) -> None:
        self._results: list[ProblemResult] = []
        self._samples: list[dict] = []
        self._started: float | None = None

    @property
    def headlines(self) -> list[str]:
        return [spec.headline for spec in self.specs.values()]

    def rows(self, name: str, load: Callable[[str, object], list[dict]]) -> list[dict]:
        spec = self.specs[name]
        if name not in self._rows:
            self._rows[name] = load(spec.key, spec.source)
        return self._rows[name]

    def chunks(self, load: Callable[[str, object], list[dict]], rank: int, world: int) -> list[EvalChunk]:
        """This rank's validation steps over every set (the same count on every rank)."""
        self._reset()
        return [chunk for name, spec in self.specs.items()
                for chunk in shard(spec, self.rows(name, load), rank, world, self.batch_size)]

    def run(self, chunk: EvalChunk, **context) -> None:
        """One validation step; ``context``: ``encoder, engine, policy, tokenizer, rewarder,
        precision_context``."""
        if self._started is None:
            self._started = time.perf_counter()
        spec = self.specs[chunk.set_name]
        out = run_chunk(spec, chunk, seed=self.seed, **context)
        self._results += out.results
        keep = self._kept_problems(spec)
        self._samples += [s for s in out.samples if s["index"] < keep]

    def _kept_problems(self, spec: EvalSpec) -> float:
        """Problems (from the first) whose samples are written: all k samples of each."""
        if self.samples_per_set < 0:
            return math.inf
        return math.ceil(self.samples_per_set / (1 if spec.greedy else spec.k))

    def finish(self, trainer, model_path: str, checkpoint_step: int | None = None) -> dict[str, float]:
        """The metrics of every set, global over ranks and the same on every rank (every rank calls
        this together); rank 0 writes the summary, the samples and their TensorBoard text. The step
        is the trainer's, or under ``validate`` the loaded checkpoint's (``checkpoint_step``)."""
        stage = "sanity" if trainer.sanity_checking else trainer.state.fn.value
        step = checkpoint_step if stage == "validate" and checkpoint_step is not None else trainer.global_step
        self.step = step
        results = gather_results(self._results)
        samples = _gather_to_zero(self._samples)
        metrics: dict[str, float] = {}
        sets = {}
        for name, spec in self.specs.items():
            mine = [r for r in results if r.set_name == name]
            values = set_metrics(spec, mine)
            metrics.update(values)
            problems = len({r.index for r in mine if r.weight > 0})
            sets[name] = {"problems": problems, **spec.describe(), "metrics": values}
        elapsed = None if self._started is None else round(time.perf_counter() - self._started, 3)
        log_dir = trainer.log_dir  # a collective under DDP (rank 0's folder is broadcast): every rank asks
        ckpt_path = trainer.ckpt_path if stage == "validate" else None  # in fit: the weights being trained
        self.last_summary = {"stage": stage, "step": step, "epoch": trainer.current_epoch, "model": model_path,
                             "ckpt_path": ckpt_path, "time_s": elapsed, "sets": sets, "metrics": metrics}
        self.summary_path = None
        if trainer.is_global_zero and log_dir is not None and sets:
            self.summary_path = Path(log_dir) / "eval_summary.json"
            self._write(Path(log_dir), step, samples, trainer.loggers, self.last_summary)
        self._reset()
        return metrics

    def _write(self, log_dir: Path, step: int, samples: list[dict], loggers: list, summary: dict) -> None:
        writer.write_json_atomic(log_dir / "eval_summary.json", summary)
        if self.samples_per_set == 0:
            return
        for name, spec in self.specs.items():
            mine = sorted((s for s in samples if s["set"] == name), key=lambda s: (s["index"], s["sample"]))
            if self.samples_per_set > 0:
                mine = mine[: self.samples_per_set]
            if not mine:
                continue
            writer.write_samples(log_dir / "eval_samples", name, step, mine)
            if self.text_samples > 0:
                text = writer.samples_markdown(mine[: self.text_samples])
                for tb in writer.tensorboard_writers(loggers):
                    tb.add_text(spec.prefix + "samples", text, global_step=step)


def _gather_to_zero(samples: list[dict]) -> list[dict]:
    """Every rank's samples on rank 0 (one ``gather_object``); other ranks get their own back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return samples
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(samples, parts, dst=0)
    return [s for part in parts for s in part] if parts is not None else samples
