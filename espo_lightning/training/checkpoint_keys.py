"""What ``PolicyModule``'s checkpoints hold, and the strict check when one is loaded.

The frozen KL reference is never saved: it is reloaded from ``model_name_or_path``. Saving drops its
keys; loading lets strict ``load_state_dict`` pass over their absence (``skip_reference``, a load
post-hook) and fails naming any other key the checkpoint lacks or has extra (``check_keys``).

With LoRA (``model.lora``) the frozen base is not saved either: the module's ``saved_policy_keys``
names the policy entries a checkpoint holds (the adapters, ``modules_to_save``), ``drop_frozen`` (a
state-dict post-hook, so FSDP2's distributed checkpoints see it too) leaves the rest out, and
``skip_reference`` passes over their absence at load."""
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
    """Load post-hook: the frozen reference's keys are not missing (it is reloaded, not saved), nor,
    with LoRA, the frozen base's."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(REFERENCE) and not _frozen(module, k)]


POLICY = "policy."


def _frozen(module, key: str) -> bool:
    saved = getattr(module, "saved_policy_keys", None)
    return saved is not None and key.startswith(POLICY) and key not in saved


def drop_frozen(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook of a LoRA run: leave the frozen base's entries out."""
    saved = module.saved_policy_keys
    for key in [k for k in state_dict if k.startswith(prefix + POLICY) and k[len(prefix):] not in saved]:
        del state_dict[key]
