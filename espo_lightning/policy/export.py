"""Export the trained policy as a Hugging Face folder (weights, config, tokenizer) that
``from_pretrained`` and vLLM load directly.

A LoRA policy (``model.lora``) is exported as a PEFT adapter folder (``adapter_config.json``,
``adapter_model.safetensors``, the tokenizer) that ``PeftModel.from_pretrained(base, folder)`` loads;
with ``merged=True`` (``model.export_merged``) also as a plain HF folder of the merged model in
``<path>/merged``."""
from __future__ import annotations

from pathlib import Path

from espo_lightning.policy.sharding import full_state_dict


def export_policy(module, path: str, merged: bool = False) -> None:
    state = full_state_dict(module.policy)  # collective under FSDP2: every rank takes part
    if module._trainer is not None and not module.trainer.is_global_zero:
        return
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    module.policy.save_pretrained(out, state_dict=state)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(out)
    print(f"[espo_lightning] exported the policy to {out}")
    if merged and getattr(module, "lora", None) is not None:
        _export_merged(module, state, out / "merged")


def _export_merged(module, state: dict, out: Path) -> None:
    """The base with the adapters merged in, under the base checkpoint's names (a plain HF folder)."""
    from espo_lightning.policy.lora import base_of, merged_state

    out.mkdir(parents=True, exist_ok=True)
    base = base_of(module.policy)
    base.save_pretrained(out, state_dict=dict(merged_state(module.policy, state)))
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(out)
    print(f"[espo_lightning] exported the merged policy (base + adapters) to {out}")
