"""Checks and adjustments the LightningModule makes to what it is given: the optimizer factory
(tried on a dummy parameter at start-up) and the policy's dropout (switched off, as TRL does)."""
from __future__ import annotations

import torch

from espo_lightning.errors import ConfigError


def check_optimizer(factory) -> None:
    """Build the optimizer once on a dummy parameter so a bad value (a negative lr, ...) fails at
    start-up with the optimizer's own message instead of after the first rollout."""
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        hint = " (model.optimizer.init_args.lr must be >= 0)" if "learning rate" in str(err) else ""
        raise ConfigError(f"model.optimizer: {err}{hint}") from err


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0: ``nn.Dropout`` modules and the float rates that attention
    implementations read from their module (``attention_dropout``, applied only in train mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "dropout_rate", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
