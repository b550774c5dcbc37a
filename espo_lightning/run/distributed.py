"""Process-group housekeeping shared by the CLI and the multi-process tests."""
from __future__ import annotations

import torch.distributed as dist


def shutdown() -> None:
    """Tear the default process group down together: a barrier first, so no rank closes its gloo
    connections while another still uses them (that rank would otherwise abort at interpreter exit
    with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
