"""The global gradient norm of a step, and gradient clipping that reuses it.

``GradientUtilizationMonitor`` logs the norm before clipping and ``trainer.gradient_clip_val`` clips
by it: both would make a pass over every gradient to compute the same number, so the module
computes it once per optimizer step (``PolicyModule.gradient_norm``) and clips with it."""
from __future__ import annotations

import torch


def total_grad_norm(parameters) -> torch.Tensor | None:
    """The global L2 norm of the parameters' gradients, or None when none has a gradient.

    Works for plain tensors (under DDP the gradients are already all-reduced) and for FSDP2
    ``DTensor`` shards, whose partial norm ``full_tensor()`` reduces over the mesh."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # DTensor
        norm = norm.full_tensor()
    return norm


def can_clip_with_norm(trainer, parameters: list[torch.nn.Parameter]) -> bool:
    """Whether clipping by a precomputed norm is exactly what Lightning's ``clip_gradients`` would do:
    the "norm" algorithm under a precision plugin that clips with ``clip_grad_norm_`` unchanged, on
    plain-tensor gradients (FSDP2's DTensor shards go through Lightning's path)."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    plugin = trainer.precision_plugin
    if GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm") != GradClipAlgorithmType.NORM:
        return False
    if type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm:
        return False
    return not any(type(p.grad) is not torch.Tensor for p in parameters if p.grad is not None)


def clip_with_shared_norm(module, optimizer, clip: float) -> None:
    """Clip ``module``'s trained parameters to ``clip`` by the norm its ``gradient_norm()`` computed
    for this step (the one ``grad/norm`` logs), exactly as Lightning's ``clip_gradients`` would;
    where that would not be exact (``can_clip_with_norm``), through Lightning's own path."""
    params = module.trained_parameters()
    if not can_clip_with_norm(module.trainer, params):
        module.clip_gradients(optimizer)
        return
    norm = module.gradient_norm()
    if norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, float(clip), norm)
