"""Export the trained policy as a Hugging Face folder (weights, config, tokenizer) that
``from_pretrained`` and vLLM load directly."""
from __future__ import annotations

from pathlib import Path

from espo_lightning.policy.sharding import full_state_dict


def export_policy(module, path: str) -> None:
    state = full_state_dict(module.policy)  # collective under FSDP2: every rank takes part
    if module._trainer is not None and not module.trainer.is_global_zero:
        return
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    module.policy.save_pretrained(out, state_dict=state)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(out)
    print(f"[espo_lightning] exported the policy to {out}")
