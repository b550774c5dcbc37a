"""A callback that records, per rank, every file the checkpoint code fsyncs (JSON lines in
``<log_path>.<rank>``), wrapping ``espo_lightning.run.checkpointing._flush`` in each rank's process."""
from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import Callback


class RecordFlushes(Callback):
    def __init__(self, log_path: str):
        self.log_path = log_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        import espo_lightning.run.checkpointing as checkpointing

        real, path = checkpointing.os.fsync, f"{self.log_path}.{trainer.global_rank}"

        def fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            with open(path, "a") as f:
                f.write(json.dumps(name) + "\n")
            return real(fd)

        checkpointing.os.fsync = fsync
