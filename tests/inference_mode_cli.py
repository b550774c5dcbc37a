"""``python -m inference_mode_cli validate ...``: the project's CLI with Lightning's evaluation loops
choosing ``torch.inference_mode`` as they do on NCCL. Lightning picks ``no_grad`` on gloo only
(``lightning/pytorch/loops/utilities.py``, ``_no_grad_context``: ``_distributed_is_initialized() and
dist.get_backend() == "gloo"``); with that module's ``_distributed_is_initialized`` answering False
the CPU run takes the GPU branch. Lightning's launcher starts the other ranks with the same ``-m``
module, so every rank runs patched."""
from __future__ import annotations

import lightning.pytorch.loops.utilities as loop_utilities

loop_utilities._distributed_is_initialized = lambda: False

if __name__ == "__main__":
    from espo_lightning.cli import main

    main()
