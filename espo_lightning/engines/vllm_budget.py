"""The colocated engine's memory, checked at start with the arithmetic in the message: the defaults
a GPU needs (bf16 engine, sleep mode, CUDA graphs), an fp32 engine beside fp32 master weights, and
a KV cache too small for the rollout's sequences.

KV cache per token: 2 (K and V) x layers x KV heads x head size x bytes. Qwen3-8B in bf16:
2 x 36 x 8 x 128 x 2 = 147,456 bytes (144 KiB); a 17,408-token sequence (1,024 prompt + 16,384
completion) needs 2.4 GiB of it."""
from __future__ import annotations

import logging

from espo_lightning.errors import ConfigError

log = logging.getLogger(__name__)
GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(config, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """KV-cache bytes of one token on one engine worker (its share of the KV heads)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_worker = max(1, kv_heads // tensor_parallel_size)
    return 2 * text.num_hidden_layers * per_worker * head_dim * dtype_bytes


def check_kv_cache(tokens: int, max_model_len: int, min_sequences: int, bytes_per_token: int | None = None) -> None:
    """Fail when the KV cache cannot hold one sequence of ``max_model_len`` tokens; warn when it
    holds fewer than ``min_sequences`` of them (the engine then decodes that few at full length at
    a time and preempts the rest)."""
    fits = tokens // max_model_len
    size = ""
    if bytes_per_token:
        size = f" ({tokens * bytes_per_token / GIB:.1f} GiB at {bytes_per_token:,} bytes per token)"
    arithmetic = (f"the engine's KV cache holds {tokens:,} tokens{size} = {fits} sequences of "
                  f"max_model_len={max_model_len:,}")
    if fits < 1:
        raise ConfigError(f"data.engine.init_args.gpu_memory_utilization: {arithmetic}; raise it, or lower "
                          "max_model_len")
    if fits < min_sequences:
        log.warning("data.engine.init_args.gpu_memory_utilization: %s, fewer than kv_cache_min_sequences=%d: "
                    "long rollouts decode that few at a time; raise gpu_memory_utilization (with sleep mode the "
                    "trainer holds only its shards while the engine runs)", arithmetic, min_sequences)


def check_engine_dtype(engine_dtype: str, master_dtype_bytes: int, num_params: int, on_cuda: bool) -> None:
    """An fp32 engine beside fp32 master weights on a GPU: twice a bf16 engine's weights and KV
    cache, and log-probs no closer to the trainer's bf16 compute."""
    if on_cuda and engine_dtype == "float32" and master_dtype_bytes == 4:
        log.warning("data.engine.init_args.dtype: float32 beside float32 master weights holds %.1f GiB of engine "
                    "weights per GPU (%.2fB parameters x 4 bytes) and halves the KV cache per GiB; 'bfloat16' (the "
                    "default on CUDA) matches the trainer's bf16-mixed compute", num_params * 4 / GIB, num_params / 1e9)


def platform_defaults(on_cuda: bool, enable_sleep_mode: bool | None, enforce_eager: bool | None) -> tuple[bool, bool]:
    """(sleep mode, eager) where the config left them unset: on CUDA sleep mode on (training gets the
    engine's memory back between rollouts) and CUDA graphs on; elsewhere neither (the CPU build has
    no sleep mode, and eager avoids its minutes of compilation)."""
    sleep = on_cuda if enable_sleep_mode is None else enable_sleep_mode
    eager = (not on_cuda) if enforce_eager is None else enforce_eager
    return sleep, eager


def engine_kv_tokens(llm) -> int | None:
    """Tokens the started engine's KV cache holds (blocks x block size), or None if not exposed."""
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        return int(cache.num_gpu_blocks) * int(cache.block_size)
    except (AttributeError, TypeError):
        return None
