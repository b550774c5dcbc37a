"""One-step-off-policy rollouts (``data.max_staleness: 1``) against the synchronous loop: seconds per
rollout, the share of generation hidden behind training, and the reward curve of each, on the
embedded chained-addition task (``conf/chain.yaml``: 64 prompts x 8 completions of ~18 tokens, four
optimizer steps per rollout, the 3-layer 128-wide model built on first use) with the CPU build of
vLLM. Variants, each on this machine's two cores:

- ``colocated``: ``VLLMEngine`` in the trainer's process (``conf/quickstart_vllm.yaml``'s engine),
  generation and training taking turns on both cores (``taskset -c 0,1``);
- ``server-sync``: ``VLLMServerEngine``, the server pinned to core 1 (``launch.cpus``), the trainer
  to core 0 (``taskset -c 0``), ``max_staleness: 0``: the trainer waits for every rollout;
- ``server-async``: the same with ``max_staleness: 1``: rollout k + 1 is generated on core 1 while
  the trainer trains on rollout k on core 0.

    python benchmarks/async_rollouts.py [--repeats 3] [--rollouts 20] [--warmup 2] [--set --key value ...]

Why this task: generation must be a large share of the synchronous loop for hiding it to matter.
On the 2-digit quickstart (4 new tokens) generation is a few decoding steps; here every completion
is ~18 tokens, so vLLM runs ~20 decoding steps per rollout while training processes the same tokens
in four forward + backward passes: on this machine's type (docs/benchmarks.md, ``make
bench-trl-vllm``) generation took 379 ms of about 1.3 s per rollout on a 6-layer model, and it is a
larger share on this 3-layer one (vLLM's CPU build spends most of a decoding step outside the
model). ``--set`` passes further CLI arguments to every run, e.g. a wider model (built on first use):
``--set --model.model_builder.init_args.num_layers 6 --model.model_name_or_path .cache/chain-128x6``.

Each (repeat, variant) is a fresh ``python -m espo_lightning fit --config conf/chain.yaml --config
<the variant's engine overlay>`` under ``taskset`` with ``OMP_NUM_THREADS`` = the cores it is given
(``--threads`` overrides), variants interleaved within each repeat, no validation, no checkpoints,
no progress bar. Everything is read from the run's TensorBoard files:

- **s / rollout**: the wall time between consecutive rollouts' ``reward/mean`` events (generation
  wait, rewards, scoring, the four updates, the weight push, callbacks), median over the rollouts
  after ``--warmup`` (vLLM's first ``generate`` warms up for seconds; an async run's first rollout is
  synchronous), then median over repeats; **speed-up** is colocated's s / rollout over the variant's;
- **generation s**: ``perf/engine_generation_s``, the engine's own time on a rollout's generation
  (request to answer); **wait s**: ``perf/generation_wait_s``, the part of it the trainer blocked on;
  **hidden**: ``perf/generation_hidden_frac`` = 1 - wait / generation (0 when synchronous);
  **update s**: ``perf/update_time_s``; **push s**: ``perf/weight_sync_s``, the trainer's time
  pushing weights to the engine per rollout;
- **reward**: ``reward/mean`` of each rollout (the training samples' mean reward), by fifths of the
  run, median over repeats; a one-step-off-policy run's reward is its stale samples' reward.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("colocated", "server-sync", "server-async")
ENGINE = {"kv_cache_space_gib": 1, "max_model_len": 64, "dtype": "auto", "seed": 0, "return_logprobs": True}


def overlay(variant: str, server_cpus: str, server_threads: int) -> dict:
    """The variant's config on top of conf/chain.yaml: its engine and ``data.max_staleness``."""
    if variant == "colocated":
        return {"data": {"engine": {"class_path": "espo_lightning.engines.VLLMEngine",
                                    "init_args": {**ENGINE, "enforce_eager": True}}}}
    launch = {"port": 0, "cpus": server_cpus, "env": {"OMP_NUM_THREADS": str(server_threads)}}
    return {"data": {"engine": {"class_path": "espo_lightning.engines.VLLMServerEngine",
                                "init_args": {**ENGINE, "launch": launch, "start_timeout_s": 900,
                                              "request_timeout_s": 600, "weights_timeout_s": 300}},
                     "max_staleness": int(variant == "server-async")}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores(cpus: str) -> int:
    count = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def run(variant: str, repeat: int, args) -> dict:
    """One fresh training run; its per-rollout numbers from TensorBoard."""
    from espo_lightning.compare.curves import load_run

    folder = args.out / variant / f"repeat{repeat}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = folder / "variant.yaml"
    config.write_text(json.dumps(overlay(variant, args.server_cpus, args.threads or cores(args.server_cpus)),
                                 indent=2))  # JSON is YAML
    cpus = f"{args.trainer_cpus},{args.server_cpus}" if variant == "colocated" else args.trainer_cpus
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or cores(cpus))}
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "espo_lightning", "fit", "--config", args.base,
           "--config", str(config), f"--trainer.max_epochs={args.rollouts}", f"--trainer.default_root_dir={folder}",
           "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", *args.set]
    (folder / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{variant} repeat {repeat} failed (exit {proc.returncode}); see {folder / 'log.txt'}")
    curves = load_run(folder, variant, repeat)
    reward = curves.series("reward/mean")
    walls = [float(w) for w in reward.wall]
    steady = slice(args.warmup, None)

    def steady_median(tag: str) -> float | None:
        curve = curves.series(tag)
        values = [] if curve is None else [float(v) for v in curve.y[steady]]
        return statistics.median(values) if values else None

    gaps = [b - a for a, b in zip(walls, walls[1:])][max(0, args.warmup - 1):]
    return {"s_per_rollout": statistics.median(gaps) if gaps else None,
            "generation_s": steady_median("perf/engine_generation_s"),
            "wait_s": steady_median("perf/generation_wait_s"),
            "hidden": steady_median("perf/generation_hidden_frac"),
            "update_s": steady_median("perf/update_time_s"),
            "push_s": steady_median("perf/weight_sync_s"),
            "reward": [float(v) for v in reward.y]}


def fifths(curve: list[float]) -> list[float]:
    n = len(curve)
    parts = [curve[i * n // 5:(i + 1) * n // 5] for i in range(5)]
    return [statistics.mean(p) for p in parts if p]


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rollouts", type=int, default=20, help="rollouts (epochs) per run")
    parser.add_argument("--warmup", type=int, default=2, help="first rollouts left out of the timings")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--base", default="conf/chain.yaml")
    parser.add_argument("--trainer-cpus", default="0", help="the trainer's cores in the server variants")
    parser.add_argument("--server-cpus", default="1", help="the server's cores (launch.cpus)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of every process; 0: the number of cores it is pinned to")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_async")
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[],
                        help="further CLI arguments for every run (last on the command line)")
    args = parser.parse_args()
    if args.rollouts <= args.warmup:
        parser.error(f"--rollouts ({args.rollouts}) must exceed --warmup ({args.warmup})")

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        for variant in args.variants:  # interleaved: machine load drifts over a run
            runs[variant].append(run(variant, repeat, args))
            timings = {k: v for k, v in runs[variant][-1].items() if k != "reward"}
            print(f"repeat {repeat + 1}/{args.repeats} {variant}: {json.dumps(timings)}", file=sys.stderr, flush=True)

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}, {cpu_name()}, {os.cpu_count()} cores; base {args.base}, "
          f"{args.rollouts} rollouts per run, timings after the first {args.warmup}; {args.repeats} interleaved "
          f"repeats, medians; colocated on cores {args.trainer_cpus},{args.server_cpus}, server variants: trainer on "
          f"{args.trainer_cpus}, server on {args.server_cpus}" + (f"; extra: {' '.join(args.set)}" if args.set else ""))
    keys = ("s_per_rollout", "generation_s", "wait_s", "hidden", "update_s", "push_s")
    m = {v: {k: med(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    base = "colocated" if "colocated" in m else args.variants[0]
    print(f"| variant | s / rollout (median; runs) | speed-up vs {base} | generation s | wait s | hidden | update s "
          "| push s | reward by fifths | mean reward |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for v, rs in runs.items():
        length = min(len(r["reward"]) for r in rs)
        curve = [statistics.median(r["reward"][i] for r in rs) for i in range(length)]
        speed = m[base]["s_per_rollout"] / m[v]["s_per_rollout"] if m[v]["s_per_rollout"] else None
        print(f"| {v} | {fmt(m[v]['s_per_rollout'])} ({', '.join(fmt(r['s_per_rollout']) for r in rs)}) "
              f"| {fmt(speed)}x | {fmt(m[v]['generation_s'])} | {fmt(m[v]['wait_s'])} | {fmt(m[v]['hidden'])} "
              f"| {fmt(m[v]['update_s'])} | {fmt(m[v]['push_s'], 3)} | {' '.join(f'{x:.3f}' for x in fifths(curve))} "
              f"| {statistics.mean(curve):.3f} |")


if __name__ == "__main__":
    main()
