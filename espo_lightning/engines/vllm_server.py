"""A vLLM generation server in its own process, for ``VLLMServerEngine``:

    python -m espo_lightning.engines.vllm_server --model DIR --port 8000 [--vllm-kwargs JSON]

It holds one ``vllm.LLM`` (in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that weights
can be reloaded into its worker) and serves a small JSON API over HTTP with the standard library:

- ``GET /health``: 200 ``{"ready": true, "pid", "weight_version"}`` once the engine is built, 503
  while it loads.
- ``POST /generate``: ``{"prompts": [[ids]], "sampling": {...}, "seeds": [..] | null}`` ->
  ``{"token_ids", "logprobs", "truncated", "weight_version"}`` (prompt-major, as ``Generation``).
- ``POST /load_weights``: ``{"path": ".../x.safetensors", "version": v}``: the file's tensors go
  through the worker's in-place ``reload_weights`` (as ``VLLMEngine`` does), then the prefix cache
  is reset; the answer names the layers that received nothing, if any.
- ``POST /init_weight_transfer_engine``: ``{"init_info": {master_address, master_port, rank_offset,
  world_size, packed, ...}}``: the workers join the trainer's NCCL group (vLLM's
  ``NCCLWeightTransferInitInfo``); it answers once the group is formed, so the trainer joins as rank 0
  while the request is in flight. Needs ``--weight-transfer nccl`` and CUDA; refused in one line
  otherwise (before any rendezvous).
- ``POST /update_weights``: ``{"update_info": {names, dtype_names, shapes}, "version": v}``: start a
  weight update, receive the tensors the trainer broadcasts in that order (vLLM's NCCL engine, loaded
  through the layerwise reload), finish it and reset the prefix cache; same answer as ``/load_weights``.
- ``POST /shutdown``: answers, then exits.

Requests are served one at a time (a lock around the engine): a weight load waits for the
generation in progress, so every generation samples from one version of the weights, which it
reports. The model is loaded with dummy weights unless ``--load-format`` says otherwise: the
trainer pushes its weights before the first generation. With ``--parent-pid`` the server exits when
that process is gone (a trainer killed with SIGKILL leaves no server behind)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("espo_lightning.vllm_server")


def sampling_params(sampling: dict, seeds: list | None, stop_ids: list[int], logprobs: bool):
    """vLLM ``SamplingParams`` for one request's JSON sampling settings (the same as ``VLLMEngine``'s)."""
    from espo_lightning.engines.base import Sampling
    from espo_lightning.engines.vllm import sampling_params as engine_sampling_params

    settings = Sampling(n=int(sampling["n"]), temperature=float(sampling["temperature"]),
                        top_p=float(sampling["top_p"]), max_new_tokens=int(sampling["max_new_tokens"]),
                        greedy=bool(sampling.get("greedy")))
    return engine_sampling_params(settings, seeds, stop_ids, logprobs)


class Server:
    """The engine and what the handlers do with it (one at a time)."""

    def __init__(self, args):
        self.args = args
        self.llm = None
        self.lock = threading.Lock()
        self.weight_version: int | None = None  # None: still the weights it was started with
        self.stop = threading.Event()
        self.collective_ready = False  # the NCCL group with the trainer is formed

    def collective(self) -> dict:
        """Whether the trainer can push weights over an NCCL group, and if not why (one line)."""
        import torch

        workers = 0
        if self.llm is not None:
            config = self.llm.llm_engine.vllm_config.parallel_config
            workers = config.world_size * config.data_parallel_size
        if self.args.weight_transfer != "nccl":
            return {"available": False, "workers": workers,
                    "reason": "the server was not started with --weight-transfer nccl"}
        if not torch.cuda.is_available():
            return {"available": False, "workers": workers,
                    "reason": "collective (NCCL) weight transfer needs CUDA and this server's vLLM runs on CPU; "
                              "use weight_transfer: file"}
        return {"available": True, "workers": workers, "reason": ""}

    def build(self) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: in-place reload
        import vllm
        from vllm.platforms import current_platform

        from espo_lightning.engines.vllm_logs import quiet_reload_logs

        quiet_reload_logs()
        if current_platform.is_cpu():
            from transformers import AutoConfig

            from espo_lightning.engines.vllm_start import check_cpu_head_size, check_cpu_reload

            config = AutoConfig.from_pretrained(self.args.model, trust_remote_code=True)
            check_cpu_head_size(config)
            check_cpu_reload(config)
        kwargs = dict(model=self.args.model, load_format=self.args.load_format, skip_tokenizer_init=True,
                      generation_config="vllm", logprobs_mode="processed_logprobs", dtype=self.args.dtype,
                      seed=self.args.seed, enforce_eager=self.args.enforce_eager,
                      max_model_len=self.args.max_model_len, trust_remote_code=True)
        if self.args.weight_transfer == "nccl":
            import torch

            if torch.cuda.is_available():  # the workers build vLLM's NCCL receiver at load
                kwargs["weight_transfer_config"] = {"backend": "nccl"}
            else:
                log.warning("vllm_server: --weight-transfer nccl needs CUDA; only /load_weights (the file path) works")
        kwargs.update(json.loads(self.args.vllm_kwargs or "{}"))
        start = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        log.info("vllm_server: engine ready in %.1fs", time.perf_counter() - start)

    def generate(self, body: dict) -> dict:
        from espo_lightning.engines.vllm import _sampled_logprobs

        logprobs = bool(body.get("logprobs", True))
        params = sampling_params(body["sampling"], body.get("seeds"), body["stop_token_ids"], logprobs)
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in body["prompts"]], params, use_tqdm=False)
            version = self.weight_version
        token_ids, truncated, lps = [], [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda c: c.index):
                token_ids.append(list(sample.token_ids))
                truncated.append(sample.finish_reason == "length")
                if logprobs:
                    lps.append([float(x) for x in _sampled_logprobs(sample)])
        return {"token_ids": token_ids, "truncated": truncated, "logprobs": lps if logprobs else None,
                "weight_version": version}

    def load_weights(self, body: dict) -> dict:
        from safetensors.torch import load_file

        from espo_lightning.engines.vllm_weights import watch_load_failures

        start = time.perf_counter()
        weights = list(load_file(body["path"]).items())
        with self.lock:
            with watch_load_failures() as failures:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
            if not failures.layers:
                self.weight_version = body.get("version")
        return {"failed_layers": sorted(set(failures.layers)), "tensors": len(weights),
                "seconds": time.perf_counter() - start, "weight_version": self.weight_version}

    def init_weight_transfer(self, body: dict) -> dict:
        """Join the trainer's NCCL group (blocks until the trainer, rank 0, joins too)."""
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

        info = _parse(NCCLWeightTransferInitInfo, body, "init_info")  # validates the rendezvous fields
        state = self.collective()
        if not state["available"]:
            raise Refused(state["reason"])
        if info.world_size != state["workers"] + info.rank_offset:
            raise Refused(f"world_size {info.world_size} != rank_offset {info.rank_offset} + "
                          f"{state['workers']} server workers")
        start = time.perf_counter()
        with self.lock:
            self.llm.init_weight_transfer_engine({"init_info": body["init_info"]})
            self.collective_ready = True
        log.info("vllm_server: NCCL weight-transfer group formed (world size %d) in %.1fs", info.world_size,
                 time.perf_counter() - start)
        return {"ok": True, "workers": state["workers"]}

    def update_weights(self, body: dict) -> dict:
        """Receive one full set of weights broadcast by the trainer over the NCCL group."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

        from espo_lightning.engines.vllm_weights import watch_load_failures

        info = _parse(NCCLWeightTransferUpdateInfo, body, "update_info")  # the three lists agree in length
        state = self.collective()
        if not state["available"]:
            raise Refused(state["reason"])
        if not self.collective_ready:
            raise Refused("no NCCL group yet: POST /init_weight_transfer_engine first")
        start = time.perf_counter()
        with self.lock:
            with watch_load_failures() as failures:
                self.llm.start_weight_update()
                self.llm.update_weights({"update_info": body["update_info"]})
                self.llm.finish_weight_update()
            self.llm.reset_prefix_cache()
            if not failures.layers:
                self.weight_version = body.get("version")
        return {"failed_layers": sorted(set(failures.layers)), "tensors": len(info.names),
                "seconds": time.perf_counter() - start, "weight_version": self.weight_version}


class Refused(Exception):
    """A request the server cannot serve as configured (answered HTTP 400, one line)."""


def _parse(cls, body: dict, key: str):
    """``cls(**body[key])`` (one of vLLM's weight-transfer dataclasses), a bad one refused in one line."""
    try:
        return cls(**body[key])
    except (KeyError, TypeError, ValueError) as err:
        raise Refused(f"bad {key}: {type(err).__name__}: {err}") from None


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # requests are not news; errors are answered in JSON
            pass

        def _answer(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path != "/health":
                return self._answer(404, {"error": f"no such endpoint: GET {self.path}"})
            ready = server.llm is not None
            self._answer(200 if ready else 503, {"ready": ready, "pid": os.getpid(),
                                                 "weight_version": server.weight_version,
                                                 "collective": server.collective()})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as err:
                return self._answer(400, {"error": f"the body is not JSON: {err}"})
            if self.path == "/shutdown":
                self._answer(200, {"ok": True})
                server.stop.set()
                return
            route = {"/generate": server.generate, "/load_weights": server.load_weights,
                     "/init_weight_transfer_engine": server.init_weight_transfer,
                     "/update_weights": server.update_weights}.get(self.path)
            if route is None:
                return self._answer(404, {"error": f"no such endpoint: POST {self.path}"})
            if server.llm is None:
                return self._answer(503, {"error": "the engine is still loading"})
            try:
                self._answer(200, route(body))
            except Refused as err:  # a bad or unservable request
                log.warning("vllm_server: %s refused: %s", self.path, err)
                self._answer(400, {"error": str(err)})
            except Exception as err:  # the client raises it as one line naming the server
                log.exception("vllm_server: %s failed", self.path)
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def watch_parent(pid: int, stop: threading.Event) -> None:
    """Exit once process ``pid`` no longer exists (polled every half second)."""
    while not stop.wait(0.5):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("vllm_server: the trainer (pid %d) is gone; exiting", pid)
            os._exit(0)  # at once, even while the engine is still loading
        except PermissionError:
            pass


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m espo_lightning.engines.vllm_server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (config.json; weights unless --load-format dummy)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (written to --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--load-format", default="dummy", help="'dummy' (default: the trainer pushes weights) or 'auto'")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--weight-transfer", choices=("file", "nccl"), default="file",
                   help="'nccl': also build vLLM's NCCL weight receiver (CUDA only); /load_weights always works")
    p.add_argument("--vllm-kwargs", default=None, help="JSON object of further vllm.LLM arguments")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    server = Server(args)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    if args.port_file:  # written only once the socket listens: a reader can connect right away
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(httpd.server_address[1]))
        os.replace(tmp, args.port_file)
    log.info("vllm_server: listening on http://%s:%d (pid %d)", args.host, httpd.server_address[1], os.getpid())
    if args.parent_pid:
        threading.Thread(target=watch_parent, args=(args.parent_pid, server.stop), daemon=True).start()
    try:
        server.build()
    except Exception:
        log.exception("vllm_server: the engine failed to start")
        httpd.shutdown()
        sys.exit(1)
    server.stop.wait()
    httpd.shutdown()
    log.info("vllm_server: stopped")
    os._exit(0)  # vLLM's threads and atexit hooks must not hold the exit up


if __name__ == "__main__":
    main()
