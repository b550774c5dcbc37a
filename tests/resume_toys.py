"""Helpers the resume tests load into their training subprocesses by import path: a callback that
SIGKILLs the whole run at a chosen point, one that kills it in the middle of writing a checkpoint,
and an HF engine that records its calls."""
from __future__ import annotations

import json
import os
import signal

import lightning as L

from espo_lightning.engines import HFEngine


def kill_run() -> None:
    """SIGKILL every process of the run (the test starts it in a session of its own)."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillAt(L.Callback):
    """Kill the run just before optimizer step ``step`` is applied (mid-update), or at the start of
    training epoch ``epoch`` (its rollout already generated)."""

    def __init__(self, step: int = 0, epoch: int = -1):
        self.step, self.epoch = step, epoch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            kill_run()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            kill_run()


class KillDuringSave(L.Callback):
    """Kill the run while checkpoint number ``save`` (1-based) is being written: half its bytes are
    on disk when the SIGKILL comes."""

    def __init__(self, save: int):
        self.save = save

    def setup(self, trainer, pl_module, stage) -> None:
        import io

        import torch
        from lightning.fabric.plugins.io import torch_io

        original, count = torch_io._atomic_save, [0]

        def interrupted(checkpoint, filepath):
            count[0] += 1
            if count[0] != self.save:
                return original(checkpoint, filepath)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            with open(filepath, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            kill_run()

        torch_io._atomic_save = interrupted


class CountingHFEngine(HFEngine):
    """HFEngine that appends one JSON line per ``generate`` call to ``log_path``."""

    def __init__(self, log_path: str, batch_size: int = 64, return_logprobs: bool = False):
        super().__init__(batch_size=batch_size, return_logprobs=return_logprobs)
        self.log_path = log_path

    def generate(self, prompt_ids, sampling, policy):
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"greedy": sampling.greedy, "n": sampling.n, "seed": sampling.seed}) + "\n")
        return super().generate(prompt_ids, sampling, policy)
