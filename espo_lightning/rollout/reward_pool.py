"""Reward functions in worker processes, with a hard wall-clock limit per completion.

At scale a rollout holds thousands of completions and a symbolic verifier can stall on one of them
(sympy on a pathological expression). In the main process nothing can interrupt it safely, so with
``data.reward_workers > 0`` every (reward function, completion) pair runs as one task in a pool of
spawned processes; a task past ``data.reward_timeout_s`` has its worker killed (SIGKILL) and
replaced, and that pair scores None ("cannot be verified"), counted as ``reward/timeout_frac``.

Workers are spawned, not forked: the trainer holds threads (and CUDA contexts) that a fork would
copy in an undefined state. The functions travel by pickle, so they must be importable (a function
of a module, or an instance of a module's class, as configs give them); each worker loads them
once, before its first task, so start-up (imports of sympy, math-verify) is never timed. A worker
whose parent dies reads end-of-file on its pipe and exits."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from espo_lightning.errors import RewardError

START_TIMEOUT_S = 300.0  # a worker that cannot import the reward functions within this fails the run


@dataclass(frozen=True)
class Task:
    func: int  # index into the pool's functions
    index: int  # completion index in the rollout


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok" (values), "error" (message), "timeout"
    values: list | None = None
    message: str = ""


def _serve(conn: Connection, payload: bytes) -> None:
    """Worker loop: load the functions, say ready, then answer one task per message."""
    try:
        funcs = pickle.loads(payload)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which names it
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        j, prompt, completion, columns = message
        try:
            values = list(funcs[j](prompts=[prompt], completions=[completion], **columns))
            reply = ("ok", values)
        except Exception as err:  # noqa: BLE001 - user code; the parent names the function
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - a return value that cannot be pickled
            conn.send(("error", f"its return value cannot be sent back to the trainer ({err})"))


class _Worker:
    def __init__(self, ctx, payload: bytes):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, payload), daemon=True, name="espo-reward-worker")
        self.process.start()
        child.close()
        self.ready = False
        self.task: Task | None = None
        self.started = time.monotonic()  # spawn time until ready, then the current task's start

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class RewardPool:
    """``workers`` processes running ``funcs`` one (function, completion) pair at a time.

    Args:
        funcs: The reward functions (picklable: importable functions or class instances).
        names: Their names for errors (import paths).
        workers: Number of processes.
        timeout_s: Wall-clock limit of one pair; None waits as long as it takes.
    """

    def __init__(self, funcs: list, names: list[str], workers: int, timeout_s: float | None):
        self.names, self.workers, self.timeout_s = names, workers, timeout_s
        for func, name in zip(funcs, names):
            try:
                pickle.dumps(func)
            except Exception as err:  # noqa: BLE001
                raise RewardError(f"reward function {name} cannot be sent to a reward worker process "
                                  f"({type(err).__name__}: {err}); give it as an import path, or set "
                                  "data.reward_workers: 0") from None
        self._payload = pickle.dumps(funcs)
        self._ctx = mp.get_context("spawn")
        self._pool: list[_Worker] = []

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._payload)

    def _started(self, worker: _Worker) -> None:
        """Read a starting worker's first message: ready, or why it could not load the functions."""
        try:
            kind, detail = worker.conn.recv()
        except (EOFError, OSError):
            kind, detail = "failed", f"the process exited with code {worker.process.exitcode}"
        if kind != "ready":
            worker.kill()
            raise RewardError(f"a reward worker could not load the reward functions {self.names}: {detail}")
        worker.ready = True

    def _finished(self, worker: _Worker, results: dict) -> None:
        task = worker.task
        try:
            kind, detail = worker.conn.recv()
        except (EOFError, OSError):
            worker.kill()
            raise RewardError(f"reward function {self.names[task.func]} killed its worker process on "
                              f"completion {task.index} (exit code {worker.process.exitcode})") from None
        results[task] = Outcome("ok", values=detail) if kind == "ok" else Outcome("error", message=detail)
        worker.task = None

    def run(self, tasks: list[Task], prompts: list, completions: list, columns: dict[str, list]) -> dict[Task, Outcome]:
        """Every task's outcome; tasks are handed out in order to whichever worker is free. Workers
        still starting (the first call, or replacements of killed ones) join as they become ready."""
        while len(self._pool) < min(self.workers, max(1, len(tasks))):
            self._pool.append(self._spawn())
        pending, results = deque(tasks), {}
        while pending or any(w.task is not None for w in self._pool):
            for worker in self._pool:
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    i = task.index
                    worker.conn.send((task.func, prompts[i], completions[i], {k: [v[i]] for k, v in columns.items()}))
                    worker.task, worker.started = task, time.monotonic()
            watched = [w for w in self._pool if w.task is not None or not w.ready]
            now = time.monotonic()
            deadlines = [w.started + (self.timeout_s if w.ready else START_TIMEOUT_S) for w in watched
                         if not w.ready or self.timeout_s is not None]
            ready = wait([w.conn for w in watched], timeout=max(0.0, min(deadlines) - now) if deadlines else None)
            now = time.monotonic()
            for k, worker in enumerate(self._pool):
                if worker not in watched:
                    continue
                if worker.conn in ready and not worker.ready:
                    self._started(worker)
                elif worker.conn in ready:
                    self._finished(worker, results)
                elif not worker.ready and now - worker.started >= START_TIMEOUT_S:
                    worker.kill()
                    raise RewardError(f"a reward worker did not start within {START_TIMEOUT_S:.0f} s")
                elif worker.ready and self.timeout_s is not None and now - worker.started >= self.timeout_s:
                    results[worker.task] = Outcome("timeout")
                    worker.kill()
                    self._pool[k] = self._spawn()
        return results

    def close(self) -> None:
        for worker in self._pool:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.process.join(timeout=5)
            worker.kill()
        self._pool = []
