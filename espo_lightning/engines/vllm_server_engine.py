"""Rollout engine on a vLLM server in its own process (its own GPUs on a real machine), the server
being ``espo_lightning.engines.vllm_server``: started by the engine (``launch``) or already running
(``base_url``). Prompts go to it as token ids; completions come back as token ids with the engine's
log-probs of the sampled tokens.

Weights (``weight_transfer``). After each rollout's updates the policy's full state dict
(``vllm_weights.engine_weights``: checkpoint names, the engine's dtype, FSDP2 shards gathered on
every rank) reaches the server by one of two paths, chosen at the first push and named in the log:

- ``file``: rank 0 writes one safetensors file under ``weights_dir`` (``/dev/shm`` by default:
  shared memory, no disk), the server reloads it in place (``reload_weights``, as ``VLLMEngine``)
  and the file is deleted. Works on CPU and across hosts (``weights_dir`` on a filesystem both see).
- ``collective``: rank 0 joins an NCCL group with the server's GPU workers (rank 0 + N workers;
  vLLM 0.32's ``vllm.distributed.weight_transfer`` NCCL engine on the server, its TCPStore
  rendezvous and packed broadcast on the trainer) and broadcasts each tensor from its GPU while the
  server's ``/update_weights`` receives them through vLLM's layerwise reload: no host copy.
  Needs CUDA on both sides and a server started with ``--weight-transfer nccl`` (a launched server
  with ``launch.devices`` is).

``auto`` takes ``collective`` when the policy is on CUDA and the server offers it (its ``/health``
says so), else ``file``.

Failures. Every request has a timeout (``request_timeout_s`` for generation, ``weights_timeout_s``
for a weight push, ``start_timeout_s`` for the start). A server that exits, refuses the connection
or does not answer in time raises ``EngineError``, one line naming the server (URL, pid) and what it
was doing ("rollout 3", "pushing weights"); the CLI prints it as such. A server the engine launched
is killed on such an error, at ``teardown`` and at interpreter exit, and it exits by itself when the
trainer process is gone."""
from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.distributed as dist

from espo_lightning.engines.base import Generation, Pending, RolloutEngine, Sampling, stop_token_ids
from espo_lightning.errors import ConfigError, EngineError

LAUNCH_KEYS = ("devices", "cpus", "port", "host", "vllm_kwargs", "env")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)


def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)


class VLLMServerEngine(RolloutEngine):
    """vLLM in a server process of its own; generation runs there while the trainer trains.

    Args:
        base_url: An already running ``python -m espo_lightning.engines.vllm_server`` (e.g.
            ``http://host:8000``); the engine neither starts nor stops it. Null: launch one.
        launch: How to start the server (when ``base_url`` is null): ``devices`` (its GPUs,
            ``CUDA_VISIBLE_DEVICES``, e.g. "4,5,6,7"), ``cpus`` (``taskset -c`` list, e.g. "0-7"),
            ``port`` (0: any free one), ``host`` (default 127.0.0.1), ``vllm_kwargs`` (further
            ``vllm.LLM`` arguments, e.g. ``{gpu_memory_utilization: 0.9}``), ``env`` (extra
            environment variables).
        dtype: Engine weight dtype ("auto": the policy's; bfloat16 for an fp32 policy under CUDA).
        max_model_len: Longest prompt + completion; default: the model config's.
        kv_cache_space_gib: KV cache in GiB on the CPU build (``VLLM_CPU_KVCACHE_SPACE`` of a launched server).
        enforce_eager: Run without CUDA graphs / compilation (faster start). Null: eager unless
            ``launch.devices`` is set.
        seed: Engine seed.
        return_logprobs: Return the engine's log-prob of each sampled token.
        weight_transfer: "auto", "file" or "collective" (see the module docstring).
        weights_dir: Where the weight file is written for the server to read; default ``/dev/shm``
            (a folder both hosts see when the server runs elsewhere).
        collective_address: The trainer's address the server's workers reach the NCCL group's
            rendezvous at (rank 0 listens there); default: this host's address on the route to the
            server (127.0.0.1 for a local one).
        collective_port: Its port; 0: a free one.
        start_timeout_s: Longest wait for a launched server to answer ``/health``.
        request_timeout_s: Longest wait for one generation request.
        weights_timeout_s: Longest wait for one weight push.
    """

    per_prompt_seeds = True
    uses_trainer_precision = False
    supports_submit = True

    def __init__(
        self,
        base_url: str | None = None,
        launch: dict | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_space_gib: int = 1,
        enforce_eager: bool | None = None,
        seed: int = 0,
        return_logprobs: bool = True,
        weight_transfer: Literal["auto", "file", "collective"] = "auto",
        weights_dir: str | None = None,
        collective_address: str | None = None,
        collective_port: int = 0,
        start_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        weights_timeout_s: float = 300.0,
    ):
        launch = dict(launch or {})
        unknown = sorted(set(launch) - set(LAUNCH_KEYS))
        _check(not unknown, "launch", f"has unknown keys {unknown} (allowed: {', '.join(LAUNCH_KEYS)})", launch)
        _check(base_url is None or base_url.startswith(("http://", "https://")), "base_url",
               "must be an http(s):// URL", base_url)
        _check(dtype in ("auto", *TORCH_DTYPES), "dtype", f"must be one of {('auto', *TORCH_DTYPES)}", dtype)
        _check(weight_transfer in ("auto", "file", "collective"), "weight_transfer",
               "must be 'auto', 'file' or 'collective'", weight_transfer)
        _check(0 <= collective_port < 65536, "collective_port", "must be a TCP port (0: a free one)", collective_port)
        for key, value in (("start_timeout_s", start_timeout_s), ("request_timeout_s", request_timeout_s),
                           ("weights_timeout_s", weights_timeout_s)):
            _check(value > 0, key, "must be > 0 (seconds)", value)
        self.base_url, self.launch = (base_url.rstrip("/") if base_url else None), launch
        self.dtype, self.max_model_len, self.kv_cache_space_gib = dtype, max_model_len, kv_cache_space_gib
        self.enforce_eager = enforce_eager if enforce_eager is not None else not launch.get("devices")
        self.seed, self.return_logprobs = seed, return_logprobs
        self.weight_transfer = weight_transfer
        self.collective_address, self.collective_port = collective_address, collective_port
        self.transfer: str | None = None  # the path chosen at the first push: "file" or "collective"
        self._collective: dict = {}  # what the server's /health says about the NCCL path
        self._group = None  # rank 0's PyNcclCommunicator with the server's workers
        self.weights_dir = weights_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.weights_timeout_s = weights_timeout_s
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.stop_ids: list[int] = []
        self.last_sync_s: float | None = None
        self._dtype: str | None = None
        self._version: int | None = None  # what the last push was labelled
        self._pushes = 0
        self._synced = False
        self._tmpdir: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._announced = False
        self._failed = False

    # ----- lifecycle ----------------------------------------------------------------------------
    def setup(self, policy: torch.nn.Module, tokenizer) -> None:
        if self.url is not None:
            return
        if tokenizer.eos_token_id is None:
            raise ConfigError("VLLMServerEngine: the tokenizer has no eos_token_id; generation could never stop early")
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self._dtype = self._resolve_dtype(policy)
        url = error = None
        collective = {}
        if _rank() == 0:
            try:
                url = self.url = self.base_url or self._launch(policy)
                health = self._health(self.start_timeout_s if self.process else self.request_timeout_s, "starting")
                collective = health.get("collective") or {
                    "available": False, "workers": 0,
                    "reason": "the server does not offer it (no 'collective' in /health)"}
            except Exception as err:
                error = err
        if _distributed():  # the other ranks talk to rank 0's server
            box = [url, None if error is None else str(error), collective]
            dist.broadcast_object_list(box, src=0)
            url, collective = box[0], box[2]
            if box[1] is not None and error is None:
                raise EngineError(box[1])
        self._collective = collective
        if error is not None:
            self.url = None
            raise error
        self.url = url
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-submit")

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.process is not None:
            try:
                self._call("POST", "/shutdown", {}, 5.0, "shutting down")
                self.process.wait(timeout=10)
            except Exception:
                pass
            self._kill()
        if self._tmpdir is not None and not self._failed:  # after a failure the server's log stays
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._tmpdir = None
        if self._group is not None:
            try:
                self._group.destroy()
            except Exception:
                pass
            self._group = None
        self.url, self._synced, self.transfer = None, False, None

    def _launch(self, policy) -> str:
        from espo_lightning.engines.vllm_start import architecture_folder

        folder, self._tmpdir = architecture_folder(policy)
        work = self._tmpdir or tempfile.mkdtemp(prefix="espo-vllm-server-")
        self._tmpdir = work
        host = self.launch.get("host", "127.0.0.1")
        port_file, self.log_path = os.path.join(work, "port"), os.path.join(work, "server.log")
        cmd = [sys.executable, "-m", "espo_lightning.engines.vllm_server", "--model", folder, "--host", host,
               "--port", str(self.launch.get("port", 0)), "--port-file", port_file, "--parent-pid", str(os.getpid()),
               "--dtype", self._dtype, "--seed", str(self.seed),
               "--enforce-eager" if self.enforce_eager else "--no-enforce-eager"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.weight_transfer == "collective" or (self.weight_transfer == "auto" and self.launch.get("devices")):
            cmd += ["--weight-transfer", "nccl"]  # the server also builds vLLM's NCCL receiver (CUDA only)
        if self.launch.get("vllm_kwargs"):
            cmd += ["--vllm-kwargs", json.dumps(self.launch["vllm_kwargs"])]
        if self.launch.get("cpus") is not None:
            cmd = ["taskset", "-c", str(self.launch["cpus"])] + cmd
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_space_gib)),
               **{str(k): str(v) for k, v in (self.launch.get("env") or {}).items()}}
        if self.launch.get("devices") is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.launch["devices"])
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)  # the server is not a rank of the trainer's process group
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self._kill)
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(port_file):
            if self.process.poll() is not None:
                raise self._error("starting", f"exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise self._error("starting", f"did not listen within {self.start_timeout_s:g}s")
            time.sleep(0.2)
        self.url = f"http://{host}:{int(open(port_file).read())}"
        _info(f"VLLMServerEngine: launched the vLLM server at {self.url} (pid {self.process.pid}, log {self.log_path})")
        return self.url

    def _health(self, timeout: float, doing: str) -> dict:
        """Poll ``/health`` until the engine is built (HTTP 503 while it loads)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = self._call("GET", "/health", None, min(10.0, timeout), doing)
                if answer.get("ready"):
                    return answer
            except EngineError as err:
                if "HTTP 503" not in str(err) and not self._alive_and_loading():
                    raise
            if time.monotonic() > deadline:
                raise self._error(doing, f"was not ready within {timeout:g}s")
            time.sleep(0.5)

    def _alive_and_loading(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its children
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        if process is not None:
            try:
                atexit.unregister(self._kill)
            except Exception:
                pass

    # ----- weights ------------------------------------------------------------------------------
    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        """Push the policy's weights by the path chosen at the first push (``choose_transfer``):
        a safetensors file the server reloads, or a broadcast over an NCCL group with its workers.
        Under FSDP2 every rank must call it (the tensors are all-gathered)."""
        self._require_setup("sync_weights")
        start = time.perf_counter()
        if self.transfer is None:
            self.transfer = self.choose_transfer(policy)
        if self.transfer == "collective":
            self._sync_collective(policy, version)
        else:
            self._sync_file(policy, version)
        self._synced, self._version = True, version
        self.last_sync_s = time.perf_counter() - start

    def choose_transfer(self, policy: torch.nn.Module) -> str:
        """"file" or "collective": ``weight_transfer``, with ``auto`` resolved (collective when the
        policy is on CUDA and the server offers the NCCL path). The same answer on every rank."""
        device = next(policy.parameters()).device
        offer = self._collective
        if self.weight_transfer == "file":
            return "file"
        if self.weight_transfer == "collective":
            if not offer.get("available"):
                raise EngineError(f"vLLM server {self.url} cannot take weights over NCCL (weight_transfer: "
                                  f"collective): {offer.get('reason', 'unknown')}")
            if device.type != "cuda":
                raise ConfigError(f"data.engine.init_args.weight_transfer 'collective' needs the policy on CUDA, it is "
                                  f"on {device.type}; use 'file' or 'auto'")
            return "collective"
        return "collective" if device.type == "cuda" and offer.get("available") else "file"

    def _sync_file(self, policy: torch.nn.Module, version: int | None) -> None:
        from espo_lightning.engines.vllm_weights import engine_weights

        rank0, error = _rank() == 0, None
        tensors, storages = {}, set()
        for name, tensor in engine_weights(policy, TORCH_DTYPES[self._dtype]):
            if not rank0:
                continue
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()  # safetensors refuses tensors that share memory (a tied head)
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        if rank0:
            try:
                self._push_file(tensors, version)
            except Exception as err:
                error = err
            tensors = None
        _raise_on_every_rank(error)

    def _sync_collective(self, policy: torch.nn.Module, version: int | None) -> None:
        """Rank 0 broadcasts each tensor over the NCCL group as it is gathered; the other ranks
        only take part in the gathers. An error on rank 0 still lets the gathers run to the end
        (every rank must consume the iterator) and is raised on every rank."""
        from espo_lightning.engines.vllm_weights import engine_weight_metadata, engine_weights

        dtype = TORCH_DTYPES[self._dtype]
        pairs = engine_weights(policy, dtype)
        error = None
        if _rank() == 0:
            try:
                if self._group is None:
                    self._join_group()
                self._broadcast(pairs, engine_weight_metadata(policy, dtype), version)
            except EngineError as err:
                error = err
            except Exception as err:  # NCCL, CUDA, a metadata mismatch: one line naming the server
                error = EngineError(f"vLLM server {self.url}: the NCCL weight push failed: "
                                    f"{type(err).__name__}: {err}".replace("\n", " "))
        for _ in pairs:  # the rest of the gathers (all of them on ranks > 0)
            pass
        _raise_on_every_rank(error)

    def _join_group(self) -> None:
        from espo_lightning.engines.vllm_server_nccl import join_group

        self._group = join_group(self)

    def _broadcast(self, pairs, meta: list, version: int | None) -> None:
        from espo_lightning.engines.vllm_server_nccl import broadcast

        self._pushes += 1
        broadcast(self, pairs, meta, version)

    def _push_file(self, tensors: dict, version: int | None) -> None:
        from safetensors.torch import save_file

        self._pushes += 1
        path = os.path.join(self.weights_dir, f"espo-weights-{os.getpid()}-{self._pushes}.safetensors")
        if not self._announced:
            self._announced = True
            why = {"file": "as configured", "auto": "auto: " + self._why_file()}.get(self.weight_transfer, "")
            _info(f"VLLMServerEngine: weights -> server via file {path} (weight_transfer={self.weight_transfer}, "
                  f"{why}; the CPU / cross-host path)")
        try:
            save_file(tensors, path)
            answer = self._call("POST", "/load_weights", {"path": path, "version": version}, self.weights_timeout_s,
                                "pushing weights")
        finally:
            if os.path.exists(path):
                os.remove(path)
        if answer.get("failed_layers"):
            raise EngineError(f"vLLM server {self.url}: received no weights for layers {answer['failed_layers']} and "
                              "kept stale ones: the policy's weight names do not map to the served model's")

    def _why_file(self) -> str:
        if not self._collective.get("available"):
            return f"no NCCL path: {self._collective.get('reason', 'unknown')}"
        return "the policy is not on CUDA"

    # ----- generation ---------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, policy: torch.nn.Module) -> Generation:
        self._require_setup("generate")
        if not self._synced:
            self.sync_weights(policy, self._version)  # a launched server starts from dummy weights
        return self._generate(prompt_ids, sampling, self.activity)

    def submit(self, prompt_ids: list[list[int]], sampling: Sampling) -> Pending:
        """Generate in a background thread (the server works while the trainer trains), from the
        weights last pushed; ``Pending.result`` returns the ``Generation`` or raises its error."""
        self._require_setup("submit")
        if not self._synced:
            raise RuntimeError("VLLMServerEngine.submit before any sync_weights: the server holds dummy weights")
        doing = self.activity
        return Pending(self._pool.submit(self._generate, [list(p) for p in prompt_ids], sampling, doing), doing)

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, doing: str) -> Generation:
        from espo_lightning.engines.vllm import _request_seed

        body = {"prompts": [list(map(int, p)) for p in prompt_ids],
                "sampling": {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                             "max_new_tokens": sampling.max_new_tokens, "greedy": sampling.greedy},
                "seeds": [_request_seed(sampling, i) for i in range(len(prompt_ids))],
                "stop_token_ids": self.stop_ids, "logprobs": self.return_logprobs}
        start = time.perf_counter()
        answer = self._call("POST", "/generate", body, self.request_timeout_s, doing)
        return Generation(answer["token_ids"], answer["truncated"], answer.get("logprobs"),
                          policy_version=answer.get("weight_version"), seconds=time.perf_counter() - start)

    # ----- HTTP -----------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None, timeout: float, doing: str) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read()).get("error", "")
            except Exception:
                detail = ""
            raise self._error(doing, f"answered HTTP {err.code} {detail}".strip(), kill=err.code != 503) from None
        except NETWORK_ERRORS as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                what = f"did not answer within {timeout:g}s"
            else:
                what = f"could not be reached ({type(reason).__name__}: {reason})".replace(": )", ")")
            raise self._error(doing, what) from None

    def _error(self, doing: str, what: str, kill: bool = True) -> EngineError:
        """One line naming the server and what it was doing; a launched server is killed."""
        if self.process is not None:
            try:  # a server killed by a signal drops its connections a moment before it can be reaped
                code = self.process.wait(timeout=2.0) if kill else self.process.poll()
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                what = f"exited with code {code}"
        pid = f" (pid {self.process.pid})" if self.process is not None else ""
        where = self.url or "(not listening yet)"
        log_hint = f"; its log: {self.log_path}" if self.log_path else ""
        if kill and self.process is not None:
            self._failed = True
            self._kill()
        return EngineError(f"vLLM server {where}{pid} {what} while {doing}{log_hint}")

    # ----- helpers --------------------------------------------------------------------------------
    def _require_setup(self, what: str) -> None:
        if self.url is None:
            raise RuntimeError(f"VLLMServerEngine.{what} called before setup(policy, tokenizer)")

    def _resolve_dtype(self, policy) -> str:
        if self.dtype != "auto":
            return self.dtype
        dtype = next(policy.parameters()).dtype
        if dtype == torch.float32 and self.launch.get("devices") is not None:
            return "bfloat16"  # a GPU server computes in bf16, as the trainer's bf16-mixed does
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "bfloat16")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _raise_on_every_rank(error: Exception | None) -> None:
    """Rank 0's error (or None) raised on every rank: the others as ``EngineError`` with its line."""
    if _distributed():
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise EngineError(box[0])
    if error is not None:
        raise error


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"data.engine.init_args.{key} {rule}, got {value!r}")
