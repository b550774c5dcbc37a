"""A rollout in a checkpoint: what the DataModule saves inside a rollout so that a resumed run
trains the rest of that very rollout, and what it saves at a rollout's end so that a resumed run
does not generate the finished rollout again (Lightning rebuilds the finished epoch's dataloader
before it moves to the next epoch).

Everything is stored as plain tensors, numbers, strings, lists and dicts, so checkpoints load with
``torch.load(weights_only=True)``. Each rank holds different rows, so the per-rank states are
gathered to rank 0, whose checkpoint (or sharded checkpoint's metadata) is the one written; every
rank reads its own entry back."""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist

from espo_lightning.run.checkpointing import rng_state, set_rng_state
from espo_lightning.errors import ConfigError
from espo_lightning.rollout.batch import RolloutBatch
from espo_lightning.rollout.stats import RolloutStats


def _plain(obj):
    """A dataclass as a dict of its fields, tensors moved to the CPU."""
    return {f.name: _cpu(getattr(obj, f.name)) for f in fields(obj)}


def _cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def rank_state(epoch: int, consumed: int, batch: RolloutBatch, stats: RolloutStats | None) -> dict:
    """This rank's rollout of ``epoch`` with ``consumed`` minibatches already trained on."""
    return {"epoch": epoch, "consumed": consumed, "batch": _plain(batch),
            "stats": _plain(stats) if stats is not None else None, "rng": rng_state()}


def gather(state: dict) -> list[dict] | None:
    """Every rank's state on rank 0 (a list indexed by rank); None on the other ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def mine(states: list[dict], rank: int, world: int, epoch: int) -> dict | None:
    """This rank's saved state for ``epoch``; a checkpoint of another number of ranks fails with
    one line (its rows are sharded by rank)."""
    if len(states) != world:
        raise ConfigError(f"the checkpoint was taken inside a rollout on {len(states)} rank(s) and is resumed on "
                          f"{world}: a rollout's rows are split by rank, so resume it on {len(states)} rank(s), or "
                          "from a checkpoint taken at the end of a rollout (checkpoint.every_n_rollouts)")
    state = states[rank]
    return state if state["epoch"] == epoch else None


def restore_batch(state: dict, device) -> RolloutBatch:
    return RolloutBatch(**state["batch"]).to(device)


def restore_stats(state: dict) -> RolloutStats | None:
    return RolloutStats(**state["stats"]) if state.get("stats") is not None else None


def checkpoint_state(current: tuple | None, consumed: int | None) -> dict:
    """The DataModule's rollout part of a checkpoint. ``current`` is (epoch, batch, stats, number of
    minibatches) of the rollout being trained, ``consumed`` the minibatches trained so far (None
    outside training). Inside a rollout: every rank's rollout (gathered to rank 0); at its end: only
    which epoch is finished."""
    state = {"rollout": None, "finished_epoch": None}
    if current is None or consumed is None:
        return state
    epoch, batch, stats, served = current
    if consumed >= served:
        state["finished_epoch"] = epoch
    else:
        state["rollout"] = gather(rank_state(epoch, consumed, batch, stats))
    return state


def restore(state: dict, epoch: int, rank: int, world: int, device) -> tuple | None:
    """(batch, stats, minibatches already trained) of ``epoch``'s rollout from a checkpoint taken
    inside it, with this rank's RNG streams put back; None when the checkpoint holds no such rollout."""
    saved = state.get("rollout")
    saved = mine(saved, rank, world, epoch) if saved else None
    if saved is None:
        return None
    set_rng_state(saved["rng"])
    return restore_batch(saved, device), restore_stats(saved), saved["consumed"]
