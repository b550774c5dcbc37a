"""LoRA: the policy trains low-rank adapters (PEFT) on a frozen base.

``PolicyModule`` wraps the loaded model with ``wrap_policy`` when ``model.lora`` is set; everything
else follows from the wrapped model's ``requires_grad`` flags and from the helpers here:

- the optimizer holds the adapters only (``configure_optimizers`` takes the trainable parameters);
- the KL reference is the same model with its adapters switched off (``AdaptersOff``): one forward
  under ``disable_adapter()``, no second copy of the base. The base is never modified in place (no
  merge/unmerge round trip, whose ``W + d - d`` is not ``W`` in floating point), so this is exactly
  the base checkpoint;
- engines that hold their own copy of the weights (vLLM) receive the merged weights under the base
  checkpoint's names (``merged_state``): ``W + scaling * B @ A`` computed out of place, one layer at
  a time, shards gathered one tensor at a time under FSDP2; or, with vLLM's own LoRA serving
  (``lora_sync: adapter``), the frozen base once (``base_state``) and the adapters alone as a PEFT
  folder at every sync (``save_adapter``);
- checkpoints hold the trainable parameters only (``trainable_keys``; the frozen base is reloaded
  from ``model_name_or_path``), and export writes a PEFT adapter folder, plus a merged HF folder
  with ``model.export_merged``.

PEFT is imported only here, and only when LoRA is used."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from espo_lightning.errors import ConfigError

ADAPTER = "default"  # PEFT's name of the one adapter a run trains
PEFT_PREFIX = "base_model.model."  # what PeftModel adds in front of the base model's names


@dataclass
class LoraSettings:
    """``model.lora``: train LoRA adapters on the frozen policy (PEFT ``LoraConfig``).

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator: the update is ``alpha / r * B A`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: Dropout on the adapters' input. Kept as given even with ``model.disable_dropout``
            (which switches the base's dropout off); above 0 the first update's log-probs differ
            from the rollout's, so the on-policy ratio is no longer exactly 1.
        target_modules: Module names (or name suffixes) that get adapters, or ``all-linear``:
            every linear layer but the LM head.
        modules_to_save: Modules trained in full next to the adapters (e.g. ``[lm_head]``); saved in
            checkpoints and the adapter folder.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"model.lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules: name at least one module, or 'all-linear'")

    def peft_config(self):
        peft = import_peft()
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
            modules_to_save=self.modules_to_save, use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM")


def import_peft():
    try:
        import peft
    except ImportError as err:
        raise ConfigError("model.lora needs the peft package: pip install 'espo-lightning[lora]' "
                          "(or pip install 'peft>=0.13')") from err
    return peft


def wrap_policy(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """``model`` with LoRA adapters (a ``PeftModel``): the adapters (and ``modules_to_save``) train,
    every base weight is frozen. Only linear adapters are supported (their merge is computed here)."""
    peft = import_peft()
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not getattr(model.config, "architectures", None):  # built in memory: engines read the class from here
        model.config.architectures = [type(model).__name__]
    try:
        policy = peft.get_peft_model(model, settings.peft_config())
    except ValueError as err:  # PEFT's message names the modules it could not find
        raise ConfigError(f"model.lora.target_modules: {err}") from err
    others = sorted({type(m).__name__ for m in policy.modules() if isinstance(m, LoraLayer)
                     and not isinstance(m, LoraLinear)})
    if others:
        raise ConfigError(f"model.lora.target_modules: only linear layers can take adapters here, got {others}")
    init_adapters(policy)
    return policy


def init_adapters(policy, seed: int = 0) -> None:
    """PEFT's initialisation of A (Kaiming-uniform; B stays 0), drawn from a CPU generator of its own:
    the same adapters on every rank (FSDP2 shards each rank's copy: ranks that drew different A would
    hold pieces of different matrices) and in every run, whatever the global RNG has done."""
    import math

    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in policy.modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                weight = module.lora_A[ADAPTER].weight
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                weight.copy_(fresh)


def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT-wrapped policy (without importing peft when it is not)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_of(model) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if is_peft(model) else model


class AdaptersOff:
    """The policy with its adapters switched off: the frozen base, used as the KL reference of a LoRA
    run. It quacks like a causal LM for ``TokenScorer`` (call, ``config``,
    ``get_output_embeddings``) and is deliberately not an ``nn.Module``: it holds no weights of its
    own, so nothing shards, moves or saves it twice."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    @property
    def config(self):
        return self.policy.config

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()


def trainable_keys(policy: torch.nn.Module, prefix: str = "") -> frozenset[str]:
    """State-dict names of the trainable parameters (what a LoRA checkpoint holds)."""
    return frozenset(prefix + name for name, p in policy.named_parameters() if p.requires_grad)


# ----- merged weights (engines and export) --------------------------------------------------------
def base_name(name: str) -> str | None:
    """The base checkpoint's name of a PEFT state-dict entry, or None for an entry that is not part
    of the merged model (adapter weights, the untrained original of a ``modules_to_save`` module)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    name = name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(".base_layer.", ".")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def merged_state(policy, state: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) of the policy with its adapters merged in, in state-dict order.

    Each adapted weight is ``W + scaling * B @ A`` (transposed for ``fan_in_fan_out``), computed in
    at least fp32 out of place and returned as a full tensor in ``W``'s dtype; every other entry is
    returned as it is (a DTensor shard stays one: the caller casts it before gathering). ``state``:
    the policy's state dict (default ``policy.state_dict()``; a full CPU copy for export). Under
    FSDP2 every rank must consume the whole iterator in the same order (``full_tensor`` gathers)."""
    from peft.tuners.lora import LoraLayer

    state = policy.state_dict() if state is None else state
    layers = {f"{name}.base_layer.weight": m for name, m in policy.named_modules()
              if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    for name, value in state.items():
        target = base_name(name)
        if target is None:
            continue
        layer = layers.get(name)
        if layer is None:
            yield target, value
            continue
        stem = name[: -len("base_layer.weight")]
        a = _full(state[f"{stem}lora_A.{ADAPTER}.weight"].detach())  # [r, in]
        b = _full(state[f"{stem}lora_B.{ADAPTER}.weight"].detach())  # [out, r]
        w = _full(value.detach())  # [out, in]
        work = torch.promote_types(w.dtype, torch.float32)
        delta = (b.to(work) @ a.to(work)) * layer.scaling[ADAPTER]
        if layer.fan_in_fan_out:
            delta = delta.t()
        yield target, (w.to(work) + delta).to(w.dtype)


def base_state(policy, state: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) of the frozen base alone, adapters left out: what an engine that
    applies the adapters itself (vLLM's LoRA serving) loads once. Entries stay as they are (DTensor
    shards included); a policy with ``modules_to_save`` would send its trained copies here."""
    state = policy.state_dict() if state is None else state
    for name, value in state.items():
        target = base_name(name)
        if target is not None:
            yield target, value


def save_adapter(policy, folder: str, dtype: torch.dtype | None = None) -> int:
    """Write the adapters alone as a PEFT folder (``adapter_config.json``,
    ``adapter_model.safetensors``, PEFT's names) that ``PeftModel.from_pretrained`` and vLLM's
    ``LoRARequest`` load; returns the bytes of the tensors written. Tensors are cast to ``dtype``
    (None: as they are) on the shard, then gathered one at a time under FSDP2: every rank must call it."""
    from safetensors.torch import save_file

    peft = import_peft()
    state = {}
    for name, value in policy.state_dict().items():
        if "lora_" in name:
            value = value.detach()
            if dtype is not None and value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
            state[name] = _full(value)
    tensors = peft.get_peft_model_state_dict(policy, state_dict=state, adapter_name=ADAPTER)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    policy.peft_config[ADAPTER].save_pretrained(folder)
    return sum(v.numel() * v.element_size() for v in tensors.values())
