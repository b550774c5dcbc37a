"""Writing already-global scalars to the loggers without ``LightningModule.log``.

``LightningModule.log`` keeps a reduction state per name and moves it to the value's device on every
call: about 1 ms per call and value on a CPU, as much as a tiny model's optimizer step spends on
its dozen diagnostics. Values that are already the same on every rank (reduced by the caller, or
computed from global counts) need none of that, so the per-step diagnostics and the policy loss
are written here: one ``log_metrics`` call per step and writer, on the logging steps only.

A TensorBoard logger gets all of a call's values as one event (one ``Summary`` holding every value,
as TensorBoard reads them): Lightning's ``log_metrics`` writes one event per value, and each event
is a hand-off to the writer's background thread that cost ~100 us on the 2-core CPU machine (the
two threads taking turns at the GIL), about 6 ms per rollout of the diagnostics' ~50 values."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.fabric.loggers import TensorBoardLogger


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
    step = max(trainer.fit_loop.epoch_loop._batches_that_stepped - (1 if epoch_level else 0), 0)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            if trainer.is_global_zero:  # as rank_zero_only on log_metrics
                _tensorboard_event(logger, values, step)
        else:
            logger.log_metrics({name: float(v) for name, v in values.items()}, step=step)


def _tensorboard_event(logger, values: Mapping[str, float], step: int) -> None:
    """``values`` as one TensorBoard event at ``step``, under the logger's prefix (what its
    ``log_metrics`` would write as one event per value)."""
    from lightning.fabric.utilities.logger import _add_prefix
    from tensorboard.compat.proto.summary_pb2 import Summary

    tagged = _add_prefix({name: float(v) for name, v in values.items()}, logger._prefix, logger.LOGGER_JOIN_CHAR)
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in tagged.items()])
    logger.experiment._get_file_writer().add_summary(summary, step)  # as Lightning's log_hyperparams writes


def show_reward(module, batch_idx: int) -> None:
    """The rollout's mean reward as ``reward`` at its first step: on the progress bar when there is
    one, and in ``callback_metrics`` for monitors (without a bar, ``self.log``'s bookkeeping is ~3 ms
    per rollout of nothing shown)."""
    if batch_idx != 0 or module._trainer is None:
        return
    rollout = getattr(module.trainer.datamodule, "last_rollout", None)
    if rollout is None:
        return
    if module.trainer.progress_bar_callback is not None:
        module.log("reward", rollout.reward_mean, prog_bar=True, logger=False, batch_size=1)
    else:
        module.trainer.callback_metrics["reward"] = torch.tensor(float(rollout.reward_mean))
