"""Writing already-global scalars to the loggers without ``LightningModule.log``.

``LightningModule.log`` keeps a reduction state per name and moves it to the value's device on every
call: about 1 ms per call and value on a CPU, as much as a tiny model's optimizer step spends on
its dozen diagnostics. Values that are already the same on every rank (reduced by the caller, or
computed from global counts) need none of that, so the per-step diagnostics and the policy loss
are written here: one ``log_metrics`` call per step and writer, on the logging steps only."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def step_is_logged(trainer) -> bool:
    """Whether Lightning writes this training step's logged values (``log_every_n_steps``); per-step
    values are reduced and copied to the host only then. Same answer on every rank."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def write_metrics(trainer, values: Mapping[str, float], epoch_level: bool = False) -> None:
    """Write already-global ``values`` to every logger and to ``trainer.callback_metrics``.

    The step is the one Lightning uses for what a training step logs (``_batches_that_stepped``, as
    its own ``LearningRateMonitor`` writes); epoch-level values go to the epoch's last step, where
    Lightning puts ``on_epoch`` values (its epoch loop has counted that step by the time
    ``on_train_epoch_end`` runs). Call on every rank: loggers write on rank 0 only, and monitors
    (``checkpoint.monitor``, ``EarlyStopping``) read ``callback_metrics`` on every rank."""
    if not values:
        return
    trainer.callback_metrics.update({name: torch.tensor(float(v)) for name, v in values.items()})
    step = trainer.fit_loop.epoch_loop._batches_that_stepped - (1 if epoch_level else 0)
    for logger in trainer.loggers:
        logger.log_metrics({name: float(v) for name, v in values.items()}, step=max(step, 0))
