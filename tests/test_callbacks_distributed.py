"""Two ranks (Lightning's ``ddp_spawn`` on CPU, gloo) log the same numbers as one process that holds
both ranks' data: per-step values are token-weighted over ranks and epoch aggregates are
synchronised by torchmetrics, never means of per-rank means."""
from __future__ import annotations

import json
import math

import pytest

from callbacks import (AdvantageHistogram, ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor,
                       RolloutMonitor)
from callback_toys import RecordingLogger, ShutdownGloo, ToyData, ToyModule, fit

# Numbers that legitimately differ: wall times, and the gradient (DDP averages per-rank gradients of
# per-rank losses, which is not the gradient of the merged batch's loss).
DIFFERENT = ("perf/", "grad/")


def _callbacks():
    return [ClipFractionMonitor(), EntropyGroupMonitor(), GradientUtilizationMonitor(), RolloutMonitor(),
            AdvantageHistogram()]


def _flatten(history) -> dict[tuple[int, str], float]:
    return {(step, name): value for step, metrics in history for name, value in metrics.items()
            if not name.startswith(DIFFERENT)}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_log_the_same_numbers_as_one_rank_with_all_the_data(tmp_path):
    path = tmp_path / "ddp.json"
    fit(_callbacks() + [ShutdownGloo()], module=ToyModule(report_sequence_clip=True), data=ToyData(),
        logger=RecordingLogger(str(path)), strategy="ddp_spawn", devices=2)
    two = _flatten(json.loads(path.read_text()))

    _, _, reference = fit(_callbacks(), module=ToyModule(report_sequence_clip=True), data=ToyData(world=2))
    one = _flatten(reference.history)

    assert set(two) == set(one)
    names = {name for _, name in one}
    for expected in ("clip/low_epoch", "clip/sequence", "ratio/max_epoch", "entropy/mean_epoch",
                     "entropy_group/1/clip_frac_epoch", "grad_util/effective_epoch", "reward/mean", "reward/std",
                     "rollout/engine_logprob_diff_max", "advantage/abs_mean_epoch"):
        assert expected in names
    for key, value in one.items():
        assert math.isfinite(two[key])
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _fsdp2_grad_norm_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from callbacks.grad_util import total_grad_norm

    # a rendezvous file, not a port found free and released (another process could take it between)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
        reference = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))  # the same data on every rank
        model(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        sharded = total_grad_norm(model.parameters())
        full = total_grad_norm(reference.parameters())
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"dtensor_grads": isinstance(model[0].weight.grad, DTensor),
                           "sharded": float(sharded), "full": float(full)}, f)
        # No rank tears gloo down while the other still talks to it (an abort at exit otherwise).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_grad_norm_of_fsdp2_dtensor_shards_is_the_full_norm(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "norm.json"
    mp.spawn(_fsdp2_grad_norm_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["dtensor_grads"]
    assert result["sharded"] == pytest.approx(result["full"], rel=1e-5)
