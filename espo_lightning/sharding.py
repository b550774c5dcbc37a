"""FSDP2 sharding of the policy and reference, applied in ``configure_model`` when the trainer runs
``ModelParallelStrategy``: one ``fully_shard`` unit per transformer block (the classes the model
lists in ``_no_split_modules``), then the root, which holds the embeddings and the head."""
from __future__ import annotations

import torch


def _is_model_parallel(module) -> bool:
    if module._trainer is None:
        return False
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(module.trainer.strategy, ModelParallelStrategy)


def shard_models(module) -> None:
    if not _is_model_parallel(module):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = module.device_mesh["data_parallel"]
    precision = str(module.trainer.precision)
    mp = None
    if precision.startswith("bf16"):
        # bf16 compute and all-gathers, fp32 master weights and gradient reduction.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model in (module.policy, module.reference):
        if model is None:
            continue
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ValueError(f"cannot shard {type(model).__name__}: it lists no transformer block classes "
                             "in _no_split_modules; use the DDP strategy for it")
        kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; a collective under FSDP2, so every rank must call it."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
