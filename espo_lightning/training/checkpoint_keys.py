"""What ``PolicyModule``'s checkpoints hold, and the strict check when one is loaded.

The frozen KL reference is never saved: it is reloaded from ``model_name_or_path``. Saving drops its
keys; loading lets strict ``load_state_dict`` pass over their absence (``skip_reference``, a load
post-hook) and fails naming any other key the checkpoint lacks or has extra (``check_keys``)."""
from __future__ import annotations

from espo_lightning.errors import ConfigError

REFERENCE = "reference."


def drop_reference(checkpoint: dict) -> None:
    """Take the frozen reference's keys out of a checkpoint about to be saved."""
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(REFERENCE)]:
        del state[key]


def check_keys(module, checkpoint: dict) -> None:
    """Fail naming any key ``checkpoint`` lacks or has extra against ``module.state_dict()``, other
    than the frozen reference's. Sharded (FSDP2) checkpoints load straight into the sharded model,
    strictly, before Lightning's load hook: a mismatch there raises torch's error listing the keys."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(REFERENCE)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        where = getattr(module._trainer, "ckpt_path", None) or "the checkpoint"
        parts = [f"{len(found)} {what} key(s) ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
                 for what, found in (("missing", missing), ("unexpected", unexpected)) if found]
        raise ConfigError(f"{where} does not match model.model_name_or_path={module.model_name_or_path}: "
                          f"{' and '.join(parts)}; resume with the model the run was trained from")


def skip_reference(module, incompatible_keys) -> None:
    """Load post-hook: the frozen reference's keys are not missing (it is reloaded, not saved)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(REFERENCE)]
