"""Callbacks the one-step-off-policy tests load into their training subprocesses by import path:
one that checks each rollout's engine log-probs against the weights it was sampled from, and one
that SIGKILLs the vLLM server in the middle of a run."""
from __future__ import annotations

import copy
import json
import os
import signal
import time

from concurrent.futures import Future

import lightning as L
import torch

from espo_lightning.engines import HFEngine, Pending


def _max_diff(model, batch, temperature: float) -> float:
    from espo_lightning.policy.scoring import sequence_logprobs

    lc = batch.completion_mask.shape[1]
    with torch.no_grad():
        logprobs = sequence_logprobs(model, batch.input_ids, batch.attention_mask, lc, temperature, chunk_size=64)
    return float((logprobs - batch.engine_logprobs).abs()[batch.completion_mask].max())


class SampledWeightsCheck(L.Callback):
    """At each epoch's start (its rollout built, the weights pushed and the next rollout submitted):
    the max |engine - trainer| log-prob of the rollout's sampled tokens under the weights it was
    sampled from (the current ones at staleness 0, the previous epoch's snapshot at staleness 1),
    and under the current weights; one JSON line per epoch to ``out``."""

    def __init__(self, out: str):
        self.out = out
        self.snapshot: dict | None = None  # the weights of the previous epoch's start (pushed then)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        epoch, batch, stats, _ = dm._current
        policy = pl_module.policy
        record = {"epoch": epoch, "staleness": stats.staleness, "policy_version": stats.policy_version,
                  "global_step": trainer.global_step, "current": _max_diff(policy, batch, dm.temperature)}
        if trainer.world_size > 1:  # FSDP2 (no deepcopy of a sharded module): staleness and versions only
            record["rank"] = trainer.global_rank
        else:
            if self.snapshot is not None:
                sampled = copy.deepcopy(policy)
                sampled.load_state_dict(self.snapshot)
                record["previous"] = _max_diff(sampled, batch, dm.temperature)
            self.snapshot = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")


class KillServer(L.Callback):
    """SIGKILL the engine's vLLM server at the start of training epoch ``epoch`` (the next rollout is
    then in flight in it); its pid goes to ``pid_file``."""

    def __init__(self, epoch: int, pid_file: str):
        self.epoch, self.pid_file = epoch, pid_file

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            pid = trainer.datamodule.engine.process.pid
            with open(self.pid_file, "w") as f:
                f.write(str(pid))
            os.kill(pid, signal.SIGKILL)


class SnapshotHFEngine(HFEngine):
    """A stand-in for an engine in its own process, without vLLM: ``sync_weights`` copies the
    policy (the "server's" weights), ``submit`` samples from that copy with transformers (at once,
    into a finished future: the same weights a background generation would use) and every
    ``Generation`` carries the version it was sampled from. Single process only."""

    supports_submit = True
    uses_trainer_precision = False

    def __init__(self, batch_size: int = 64, push_s: float = 0.0):
        super().__init__(batch_size=batch_size, return_logprobs=True)
        self.copy, self.version, self.push_s = None, None, push_s

    def sync_weights(self, policy, version=None):
        time.sleep(self.push_s)  # a push that takes time, as a server's reload does
        self.copy, self.version = copy.deepcopy(policy).eval(), version

    def generate(self, prompt_ids, sampling, policy):
        if self.copy is None:
            self.sync_weights(policy)
        gen = super().generate(prompt_ids, sampling, self.copy)
        gen.policy_version = self.version
        return gen

    def submit(self, prompt_ids, sampling):
        future = Future()
        future.set_result(self.generate(prompt_ids, sampling, None))
        return Pending(future)
