"""Preemption-safe checkpoints: ``last.ckpt`` after every rollout (and, optionally, every N optimizer
steps inside one), written atomically, and found again by ``--ckpt_path last``.

Atomic: a checkpoint is written under a temporary name beside its final one, flushed to disk, and
renamed over the previous one only when every rank has finished writing, so a kill at any moment
leaves either the old or the new checkpoint whole. A sharded (FSDP2) checkpoint is a folder; it is
swapped in by two renames (old folder aside, new folder in) and a kill between them leaves the old
one as ``last.ckpt.old``, which ``resume_path`` falls back to.

What a checkpoint holds beyond Lightning's (weights, optimizer, scheduler, loop progress): the
DataModule's state (``RolloutDataModule.state_dict``): the data walk, and inside a rollout that
rollout's scored batch and its position, so training resumes at the next minibatch of the same
rollout rather than regenerating it with a newer policy."""
from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint

from espo_lightning.errors import ConfigError

LAST, BEST = "last.ckpt", "best.ckpt"


class RolloutCheckpoint(Checkpoint):
    """Saves ``last.ckpt`` (and optionally ``best.ckpt``) into ``dirpath``. Configured under the
    top-level ``checkpoint:`` key of a config.

    Args:
        dirpath: Folder of the checkpoints; default ``<trainer.default_root_dir>/checkpoints`` (the
            same folder for every run and resume of that root, so resumes overwrite one ``last.ckpt``
            instead of piling up one per log version).
        every_n_rollouts: Save ``last.ckpt`` at the end of every N-th rollout (epoch); 0 never.
        every_n_train_steps: Also save ``last.ckpt`` every N optimizer steps inside a rollout (with
            the rollout, for an exact mid-rollout resume); 0 never.
        monitor: Metric that decides ``best.ckpt`` (e.g. ``val/accuracy``); None keeps no best.
        mode: ``max`` or ``min``: which direction of ``monitor`` is better.
    """

    def __init__(self, dirpath: str | None = None, every_n_rollouts: int = 1, every_n_train_steps: int = 0,
                 monitor: str | None = None, mode: str = "max"):
        if every_n_rollouts < 0 or every_n_train_steps < 0:
            raise ConfigError("checkpoint.every_n_rollouts and checkpoint.every_n_train_steps must be >= 0 "
                              f"(0: never), got {every_n_rollouts} and {every_n_train_steps}")
        if mode not in ("max", "min"):
            raise ConfigError(f"checkpoint.mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = dirpath
        self.every_n_rollouts, self.every_n_train_steps = every_n_rollouts, every_n_train_steps
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self._last_step_saved: int | None = None

    # ----- where -----------------------------------------------------------------------------
    def folder(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def resume_path(self, trainer) -> Path | None:
        """The checkpoint ``--ckpt_path last`` resumes: ``last.ckpt``, or the previous one left as
        ``last.ckpt.old`` by a kill between the two renames of a folder swap."""
        folder = self.folder(trainer)
        for name in (LAST, LAST + ".old"):
            if (folder / name).exists():
                return folder / name
        return None

    # ----- when ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if not n or trainer.sanity_checking or trainer.global_step == 0 or trainer.global_step % n:
            return
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if last_batch and self._saves_at_epoch_end(trainer):
            return  # the end-of-rollout save follows at once
        self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._saves_at_epoch_end(trainer):
            self._save_last(trainer)
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)) and self._improves(float(value)):
                self.best_score = float(value)
                self._save(trainer, BEST)

    def _saves_at_epoch_end(self, trainer) -> bool:
        n = self.every_n_rollouts
        return bool(n) and (trainer.current_epoch + 1) % n == 0

    def _improves(self, value: float) -> bool:
        if self.best_score is None:
            return True
        return value > self.best_score if self.mode == "max" else value < self.best_score

    def _save_last(self, trainer) -> None:
        if self._last_step_saved == (trainer.current_epoch, trainer.global_step):
            return
        self._save(trainer, LAST)
        self._last_step_saved = (trainer.current_epoch, trainer.global_step)

    # ----- how -------------------------------------------------------------------------------
    def _save(self, trainer, name: str) -> None:
        """Write under ``<name>.tmp``, then rename into place once every rank is done."""
        folder = self.folder(trainer)
        final, tmp = folder / name, folder / (name + ".tmp")
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # the remains of a write a kill interrupted
        trainer.strategy.barrier("checkpoint-prepare")
        # A sharded checkpoint's shards are flushed by the rank that wrote each one, on its own node
        # (torch.distributed.checkpoint's FileSystemWriter, sync_files=True: the only fsync that
        # reaches a node's dirty pages on a shared filesystem); rank 0 flushes what it wrote itself
        # (meta.pt, a one-file checkpoint) and, after the renames, the folder.
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimizer, loops, rollout
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            _flush(tmp)
            commit(tmp, final)
            _flush_folder(folder)  # the renames themselves
        trainer.strategy.barrier("checkpoint-committed")

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "monitor": self.monitor}

    def load_state_dict(self, state: dict) -> None:
        if state.get("monitor") == self.monitor:
            self.best_score = state.get("best_score")


def commit(tmp: Path, final: Path) -> None:
    """Put the finished ``tmp`` where ``final`` is, atomically for a file (one rename over the old
    file); for a folder the old one is renamed aside first and removed after."""
    if tmp.is_file() and not final.is_dir():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    if final.exists():
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _flush(path: Path) -> None:
    """fsync the checkpoint's files, so a machine crash after the rename cannot leave a renamed but
    unwritten file (a process kill alone cannot: the page cache survives it)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _flush_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def rng_state() -> dict:
    """This process's torch RNG streams (CPU and CUDA), for an exact mid-rollout resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

