"""The stable contract between ``PolicyModule.training_step`` and the diagnostics callbacks.

Reading a step
--------------
``training_step`` returns ``{"loss": loss, "metrics": metrics, "batch": batch}``. Lightning hands that
dict to ``Callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)`` as
``outputs``. Callbacks read it only through two functions, so the step output may grow without
breaking them:

- ``step_diagnostics(outputs) -> dict[str, Tensor]``: the loss's detached scalar metrics, keyed as
  in DESIGN section 2: ``clip/low``, ``clip/high``, ``clip/total``, ``grad_util/token``,
  ``grad_util/sequence``, ``ratio/mean``, ``ratio/max``, ``count/tokens`` (valid tokens of this
  minibatch on this rank), ``count/sequences`` (responses with at least one valid token), and
  optionally ``clip/sequence``, ``kl/mean`` and ``entropy_group/<k>/{size_frac, entropy_mean,
  epsilon_mean, clip_frac, ratio_mean}`` (k = 0 is the highest-entropy group; all but
  ``size_frac`` are token-weighted within group k, so group k holds ``size_frac * count/tokens``
  tokens). Empty dict when the step returned nothing.
- ``step_batch(outputs, batch=None) -> RolloutBatch | None``: the minibatch the step trained on
  (``completion_mask``, ``entropies``, ``advantages``, ...; see ``espo_lightning.rollout.batch``).

Aggregating
-----------
``DiagnosticsCallback`` keeps its epoch aggregates as small tensors on the module's device and
gives subclasses these helpers:

- ``log_step(pl_module, means, maxes)``: logs per-step values under their plain names
  (``clip/low``). With ``sync_step=True`` (default) the value logged is the *global* token-weighted
  value of the step over all ranks (one ``all_reduce`` of a small packed tensor per callback per
  step); with ``sync_step=False`` it is rank 0's local value and no communication happens. Steps
  that Lightning does not log (``trainer.log_every_n_steps``) cost nothing: no reduction, no host
  copy.
- ``accumulate(pl_module, name, value, weight)`` / ``accumulate_max(...)``: add to the epoch
  aggregate of ``name`` (a weighted mean with weight = tokens or sequences, or a maximum).
- ``record_step(pl_module, means, maxes)``: both of the above for a step's values. Accumulating
  only queues the values (no tensor op); the queue is folded in when the epoch is read, so a step
  that is not logged costs a few list appends.
- ``log_epoch(pl_module)``: called at ``on_train_epoch_end``; logs every aggregate as
  ``<name>_epoch`` (``clip/low_epoch``), summed (maxed) over ranks in one ``all_reduce`` each, so a
  2-rank run logs the same number as a 1-rank run on the same data; then resets. Aggregates with
  no weight (an empty epoch, an always-empty entropy group) are not logged, so no NaN is ever
  logged.

Writing
-------
Values reach the loggers through ``write_metrics``: one ``log_metrics`` call per callback and step
(or epoch), at the step Lightning writes its own values of that step (epoch values at the epoch's
last step, as ``self.log(on_epoch=True)`` places them), and into ``trainer.callback_metrics`` so
that monitors (``checkpoint.monitor``, ``EarlyStopping``) see them. Every value is already global,
so nothing of ``LightningModule.log``'s reduction machinery is needed (``espo_lightning.training.log_writer``
says what that costs).

TensorBoard's Custom Scalars tab shows the charts callbacks declare with ``tensorboard_charts``
(``callbacks/layout.py``); ``DiagnosticsCallback.on_train_start`` writes them, once per run.

Every rank must run the same number of steps and report the same metric names at each step (true
for ``espo_lightning.losses``: the names depend only on the loss's configuration), because the
reductions are collectives.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor
from callbacks.layout import Chart, write_layout
from espo_lightning.training.log_writer import step_is_logged, write_metrics  # noqa: F401 (re-exported for callbacks)
from espo_lightning.rollout.batch import unwrap

EPOCH_SUFFIX = "_epoch"


def step_diagnostics(outputs) -> dict[str, Tensor]:
    """The loss's detached scalar metrics of one training step (``outputs["metrics"]``), or ``{}``."""
    if not isinstance(outputs, Mapping):
        return {}
    metrics = outputs.get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, Tensor)}


def step_batch(outputs, batch=None):
    """The ``RolloutBatch`` a training step trained on: ``outputs["batch"]``, else the hook's ``batch``
    argument when it looks like one (has ``completion_mask``), else None."""
    candidate = outputs.get("batch") if isinstance(outputs, Mapping) else None
    for b in (candidate, unwrap(batch)):  # the DataLoader serves a ServedBatch holding the RolloutBatch
        if b is not None and hasattr(b, "completion_mask"):
            return b
    return None


def entropy_group_indices(diagnostics: Mapping[str, Tensor]) -> list[int]:
    """The group indices k present as ``entropy_group/<k>/...`` keys, ascending."""
    ks = set()
    for key in diagnostics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "entropy_group" and parts[1].isdigit():
            ks.add(int(parts[1]))
    return sorted(ks)


def _scalar(x, device) -> Tensor:
    if isinstance(x, Tensor) and x.dtype == torch.float32 and x.dim() == 0 and x.device == device \
            and not x.requires_grad:  # the loss's metrics already are: no op (the fold packs dozens)
        return x
    return torch.as_tensor(x).detach().to(device=device, dtype=torch.float32).reshape(())


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def tensorboard_writers(trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer, on global rank 0 only."""
    if not trainer.is_global_zero:
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class DiagnosticsCallback(L.Callback):
    """Base class of the diagnostics callbacks: per-step logging and synced epoch aggregates.

    Args:
        sync_step: Log per-step values reduced over all ranks (token-weighted, one small
            ``all_reduce`` per step). False logs rank 0's local value with no communication.
        log_every_step: Log per-step values at all (epoch aggregates are logged regardless).
    """

    def __init__(self, sync_step: bool = True, log_every_step: bool = True) -> None:
        super().__init__()
        self.sync_step = sync_step
        self.log_every_step = log_every_step
        # The epoch's aggregates: name -> [2] (sum of value x weight, sum of weight), name -> [] max.
        # Steps only queue their values (``_pending``: no tensor op per step; each small op costs
        # ~10-20 us on a CPU, and a step's diagnostics were dozens of them); the queue is folded in
        # with a handful of ops whenever the aggregates are read, in the order it was queued.
        self._sums: dict[str, Tensor] = {}
        self._maxes: dict[str, Tensor] = {}
        self._pending: list[tuple[str, object, object]] = []  # (name, value, weight), in order
        self._pending_max: list[tuple[str, object]] = []
        self._device = torch.device("cpu")  # the module's, where the aggregates live

    # ----- epoch aggregates -------------------------------------------------------------------
    @staticmethod
    def _pack(means: Mapping[str, tuple[Tensor, Tensor]], names: list[str], device) -> Tensor:
        """``[N, 2]``: (value x weight, weight) of ``names`` in order, float32 on ``device``."""
        values = torch.stack([_scalar(means[n][0], device) for n in names])  # [N]
        weights = torch.stack([_scalar(means[n][1], device) for n in names])  # [N]
        return torch.stack([values * weights, weights], dim=-1)

    def accumulate(self, pl_module, name: str, value: Tensor, weight: Tensor | float) -> None:
        """Add ``value`` with ``weight`` (tokens or sequences it averages over) to the epoch mean of ``name``."""
        self._device = pl_module.device
        self._pending.append((name, value, weight))

    def accumulate_many(self, pl_module, means: Mapping[str, tuple[Tensor, Tensor | float]]) -> None:
        """``accumulate`` for several names at once: ``means`` maps name -> (value, weight)."""
        self._device = pl_module.device
        self._pending.extend((name, v, w) for name, (v, w) in means.items())

    def accumulate_max(self, pl_module, name: str, value: Tensor) -> None:
        self._device = pl_module.device
        self._pending_max.append((name, value))

    def _fold_pending(self, device) -> None:
        """Add the queued values to the aggregates, each name's in the order they were queued, one
        after the other as if added step by step (a deterministic sum: no atomics, no tree)."""
        if self._pending:
            pending, self._pending = self._pending, []
            order = list(dict.fromkeys(name for name, _, _ in pending))
            slot = {name: i for i, name in enumerate(order)}
            seen = dict.fromkeys(order, 0)
            turn = []  # how many earlier rows of the same name: the row's place in that name's sum
            for name, _, _ in pending:
                turn.append(seen[name])
                seen[name] += 1
            rows = self._pack({i: (v, w) for i, (_, v, w) in enumerate(pending)}, list(range(len(pending))), device)
            steps = torch.zeros(max(turn) + 1, len(order), 2, device=device)  # [turns, names, 2], 0 where absent
            steps[torch.tensor(turn, device=device), torch.tensor([slot[n] for n, _, _ in pending], device=device)] = rows
            totals = [self._sums.get(name) for name in order]
            base = torch.stack([t if t is not None and t.device == steps.device else steps.new_zeros(2) for t in totals])
            for step in steps.unbind(0):  # adding a 0 row changes nothing: x + 0.0 == x
                base = base + step
            self._sums.update(zip(order, base.unbind(0)))
        if self._pending_max:
            pending, self._pending_max = self._pending_max, []
            for name in dict.fromkeys(name for name, _ in pending):
                values = [_scalar(v, device) for n, v in pending if n == name]
                best = self._maxes.get(name)
                if best is not None and best.device == values[0].device:
                    values.insert(0, best)
                self._maxes[name] = torch.stack(values).max()

    def compute_epoch(self) -> dict[str, float]:
        """Every aggregate of the epoch, summed (maxed) over ranks (collective: call on all ranks,
        with the same names on each), without the ones that saw no weight. Does not reset."""
        self._fold_pending(self._device)
        out: dict[str, float] = {}
        names = sorted(self._sums)
        if names:
            packed = torch.stack([self._sums[n] for n in names])  # [N, 2]
            if distributed():
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            for name, (s, w) in zip(names, packed.cpu().tolist()):  # one transfer for all of them
                if w > 0 and math.isfinite(s / w):
                    out[name] = s / w
        max_names = sorted(self._maxes)
        if max_names:
            packed = torch.stack([self._maxes[n] for n in max_names])  # [M]
            if distributed():
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
            for name, v in zip(max_names, packed.cpu().tolist()):
                if math.isfinite(v):
                    out[name] = v
        return dict(sorted(out.items()))

    def reset_epoch(self) -> None:
        self._sums.clear()
        self._maxes.clear()
        self._pending.clear()
        self._pending_max.clear()

    def log_epoch(self, pl_module, suffix: str = EPOCH_SUFFIX) -> dict[str, float]:
        """Log every aggregate as ``<name><suffix>`` and reset; returns what was logged."""
        values = self.compute_epoch()
        self.reset_epoch()
        write_metrics(pl_module.trainer, {name + suffix: value for name, value in values.items()}, epoch_level=True)
        return values

    # ----- per-step values --------------------------------------------------------------------
    def reduce_step(
        self, pl_module, means: Mapping[str, tuple[Tensor, Tensor]], maxes: Mapping[str, Tensor] | None = None,
        packed: Tensor | None = None,
    ) -> dict[str, float]:
        """Per-step values: ``means`` maps name -> (value, weight), reduced to ``sum(v w) / sum(w)``
        over ranks when ``sync_step``; ``maxes`` maps name -> value, reduced with max. Names whose
        total weight is 0 are left out. Same names on every rank (collective). ``packed``: the
        means already packed by ``_pack`` in sorted name order."""
        device = pl_module.device
        out: dict[str, float] = {}
        names = sorted(means)
        if names:
            packed = self._pack(means, names, device) if packed is None else packed.clone()  # [N, 2]
            if self.sync_step and distributed():
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            for name, (s, w) in zip(names, packed.cpu().tolist()):
                if w > 0 and math.isfinite(s / w):
                    out[name] = s / w
        max_names = sorted(maxes or {})
        if max_names:
            packed = torch.stack([_scalar(maxes[n], device) for n in max_names])
            if self.sync_step and distributed():
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
            for name, v in zip(max_names, packed.cpu().tolist()):
                if math.isfinite(v):
                    out[name] = v
        return out

    def log_step(
        self, pl_module, means: Mapping[str, tuple[Tensor, Tensor]], maxes: Mapping[str, Tensor] | None = None,
        packed: Tensor | None = None,
    ) -> dict[str, float]:
        """Reduce (see ``reduce_step``) and log per-step values under their plain names."""
        if not self.log_every_step or not step_is_logged(pl_module.trainer):
            return {}
        values = self.reduce_step(pl_module, means, maxes, packed)
        write_metrics(pl_module.trainer, values)
        return values

    def record_step(
        self, pl_module, means: Mapping[str, tuple[Tensor, Tensor]], maxes: Mapping[str, Tensor] | None = None
    ) -> dict[str, float]:
        """A step's values into the epoch aggregates and the logs: ``accumulate_many`` /
        ``accumulate_max`` for each, then ``log_step`` (which does tensor work on logged steps only)."""
        self.accumulate_many(pl_module, means)
        for name, value in (maxes or {}).items():
            self.accumulate_max(pl_module, name, value)
        return self.log_step(pl_module, means, maxes)

    # ----- TensorBoard's Custom Scalars tab (callbacks/layout.py) ---------------------------------
    def tensorboard_charts(self) -> list[Chart]:
        """The charts of this callback's metrics in the Custom Scalars tab; none by default."""
        return []

    # ----- hooks ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        write_layout(trainer)  # the first callback there writes every callback's charts, once

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.reset_epoch()  # drop partial state of an interrupted epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.log_epoch(pl_module)
