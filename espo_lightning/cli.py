"""``python -m espo_lightning fit --config conf/X.yaml``: a LightningCLI over ``PolicyModule`` and
``RolloutDataModule``. Losses, engines, rewards, optimizers and callbacks are chosen in YAML by
``class_path``; constructor signatures are the schema and their docstrings the ``--help``."""
from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI

from espo_lightning.run.checkpointing import RolloutCheckpoint
from espo_lightning.run.cli_errors import one_line
from espo_lightning.run.distributed import shutdown
from espo_lightning.errors import ConfigError, EngineError
from espo_lightning.evaluation.report import format_report
from espo_lightning.training.module import PolicyModule
from espo_lightning.rollout.datamodule import RolloutDataModule

# An epoch is one rollout: the DataModule must be asked for fresh rollouts every epoch, and the
# sanity check is the full greedy evaluation before the first update.
TRAINER_DEFAULTS = {
    "reload_dataloaders_every_n_epochs": 1,
    "num_sanity_val_steps": -1,
    "max_epochs": 20,
    "log_every_n_steps": 1,
}


class ESPOLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configured under the top-level `checkpoint:` key: last.ckpt after every rollout.
        parser.add_lightning_class_args(RolloutCheckpoint, "checkpoint")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # the user's off switch covers ours too
            callbacks = [c for c in callbacks if not isinstance(c, RolloutCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        # Constructors validate their arguments with ValueError; at this point that is always a
        # config mistake, so report it as one line rather than a traceback.
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def before_fit(self) -> None:
        self.datamodule.check_data()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = self._last_checkpoint()
        if config.get("ckpt_path"):
            # The greedy evaluation before the first update was done by the run being resumed.
            self.trainer.num_sanity_val_steps = 0

    def _last_checkpoint(self, required: bool = False) -> str | None:
        """``--ckpt_path last``: the run folder's last.ckpt, or a fresh start when there is none yet
        (so a preemptible job can always be launched with it; ``required``: an error instead)."""
        callback = next(c for c in self.trainer.callbacks if isinstance(c, RolloutCheckpoint))
        path = callback.resume_path(self.trainer)
        if path is None and required:
            raise ConfigError(f"--ckpt_path last: no checkpoint in {callback.folder(self.trainer)}")
        if path is None:
            print(f"--ckpt_path last: no checkpoint in {callback.folder(self.trainer)} yet; starting from scratch",
                  file=sys.stderr)
            return None
        print(f"--ckpt_path last: {'evaluating' if required else 'resuming from'} {path}", file=sys.stderr)
        return str(path)

    def before_validate(self) -> None:
        """``validate --ckpt_path X`` evaluates a checkpoint (``last``: the run's last.ckpt), and
        ``validate --model.model_name_or_path runs/.../policy`` an exported folder, on every set of
        ``data.val_data``; the metrics and ``eval_summary.json`` go to the run's log folder."""
        self.datamodule.check_data()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = self._last_checkpoint(required=True)

    def after_validate(self) -> None:
        """The result on stdout (rank 0): every set's metrics as a table and the summary's path."""
        if not self.trainer.is_global_zero:
            return
        evaluator = self.datamodule.evaluator
        if evaluator.last_summary is None:
            print("validate: no evaluation ran (data.val_data has no sets)")
            return
        print(format_report(evaluator.last_summary, evaluator.summary_path), flush=True)


def main(args: list[str] | None = None) -> None:
    try:
        ESPOLightningCLI(
            PolicyModule,
            RolloutDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
        shutdown()
    except (ConfigError, EngineError, FileNotFoundError, argparse.ArgumentError) as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
