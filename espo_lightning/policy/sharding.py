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


def streams_weights(module) -> bool:
    """Whether ``configure_model`` builds the models empty and streams their weights into the shards
    (``espo_lightning.policy.loading``): FSDP2 over more than one rank. One process and DDP load as usual."""
    return _is_model_parallel(module) and module.trainer.world_size > 1


def shard_models(module) -> None:
    if not _is_model_parallel(module):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if module.device_mesh["tensor_parallel"].size() != 1:
        # Only the data-parallel dimension is used: every rank trains on its own rollout share, so a
        # tensor-parallel dimension would hold ranks whose gradients are never averaged.
        from espo_lightning.errors import ConfigError

        sizes = dict(zip(module.device_mesh.mesh_dim_names, module.device_mesh.shape))
        raise ConfigError("trainer.strategy: set ModelParallelStrategy's tensor_parallel_size to 1 and "
                          f"data_parallel_size to the number of ranks (nodes x devices), got {sizes} (the "
                          "'auto' defaults make tensor_parallel_size the devices per node)")
    mesh = module.device_mesh["data_parallel"]
    precision = str(module.trainer.precision)
    mp = None
    if precision.startswith("bf16"):
        # bf16 compute and all-gathers, fp32 master weights and gradient reduction.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if module.policy is not None:
        shard_model(module.policy, mesh, mp)
    if module.reference is not None:
        shard_model(module.reference, mesh, mp, frozen=True)
        # The frozen reference is reloaded from its checkpoint, never saved. Dropping it in
        # on_save_checkpoint is not enough here: resuming loads a distributed checkpoint into the
        # module's state dict, which then asks for keys the checkpoint does not have.
        module.register_state_dict_post_hook(_drop_reference)


def shard_model(model: torch.nn.Module, mesh, mp_policy=None, frozen: bool = False) -> None:
    """``fully_shard`` on each transformer block, then on the root (embeddings, head, final norm).

    ``frozen``: a model that only runs forwards (the reference). FSDP2 leaves the *root* unsharded
    after its forward when ``reshard_after_forward`` is left at None (``FSDPState._lazy_init``: the
    root's ``post_forward_mesh_info`` is set to None because "for training, the parameters would be
    freed and all-gathered immediately" by the backward); with no backward that is the embeddings and
    the head gathered for good (2.5 GB per rank for Qwen3-8B in bf16), so it is asked for explicitly."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"cannot shard {type(model).__name__}: it lists no transformer block classes "
                         "in _no_split_modules; use the DDP strategy for it")
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if frozen else {}))


def _drop_reference(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "reference.")]:
        del state_dict[key]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU. Under FSDP2 it is a collective (every rank must call
    it) and only rank 0 receives the tensors; the other ranks get an empty dict."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
