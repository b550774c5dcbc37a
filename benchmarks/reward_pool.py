"""Scoring a rollout's completions with math_accuracy in the trainer's process and in reward
worker pools (``data.reward_workers``), as a markdown table.

    python benchmarks/reward_pool.py [--completions 2048] [--workers 1 2] [--rounds 3]

Completions are GSM8K-style answers built from the real GSM8K test file when it is there (else
synthetic): a quarter correct with ``\\boxed{}``, a quarter wrong, a quarter with the answer in a
``####`` line and a quarter of prose with no stated answer, each padded with a paragraph of
reasoning. Every round scores the same completions with each variant in the same order; the table
reports the median over rounds, completions per second, and the ratio to in-process scoring. Pool
start-up (spawning workers, importing sympy and math-verify) is timed separately: it happens once
per run. On a 2-core machine the pool's parallelism cannot show; what the table shows is the
overhead of one task per (function, completion) pair.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espo_lightning.rewards import math_accuracy  # noqa: E402
from espo_lightning.rollout.rewarding import Rewarder  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared/data/gsm8k_test.jsonl"
REASONING = "First we add the numbers, then we check the units carefully. " * 8


def completions(n: int) -> tuple[list[str], list[str]]:
    golds = []
    if GSM8K.exists():
        golds = [json.loads(line)["answer"].split("####")[-1].strip() for line in GSM8K.open()][:n]
    golds = (golds or [str(17 * i + 3) for i in range(n)]) * (n // max(1, len(golds) or n) + 1)
    golds = golds[:n]
    texts = []
    for i, gold in enumerate(golds):
        kind = i % 4
        if kind == 0:
            texts.append(f"{REASONING}So the answer is \\boxed{{{gold}}}.")
        elif kind == 1:
            texts.append(f"{REASONING}So the answer is \\boxed{{{gold}1}}.")
        elif kind == 2:
            texts.append(f"{REASONING}\n#### {gold}")
        else:
            texts.append(f"{REASONING}I am not sure.")
    return texts, golds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts, golds = completions(args.completions)
    prompts, columns = ["q"] * len(texts), {"answer": golds}
    variants = {"in process": Rewarder([math_accuracy], [1.0], math_accuracy)}
    startup = {}
    for w in args.workers:
        rewarder = Rewarder([math_accuracy], [1.0], math_accuracy, workers=w, timeout_s=30.0)
        t0 = time.perf_counter()
        rewarder.score(prompts[:w], texts[:w], {"answer": golds[:w]})  # spawns and warms the workers
        startup[f"{w} worker(s)"] = time.perf_counter() - t0
        variants[f"{w} worker(s)"] = rewarder
    times: dict[str, list[float]] = {k: [] for k in variants}
    reference = None
    for _ in range(args.rounds):
        for name, rewarder in variants.items():
            t0 = time.perf_counter()
            out = rewarder.score(prompts, texts, columns)
            times[name].append(time.perf_counter() - t0)
            reference = reference or out.total
            assert out.total == reference, f"{name} scored differently"
    for rewarder in variants.values():
        rewarder.close()
    base = statistics.median(times["in process"])
    print(f"{args.completions} completions, math_accuracy, median of {args.rounds} rounds\n")
    print("| variant | seconds | completions/s | vs in process | start-up s |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.2f} | {args.completions / m:.0f} | {m / base:.2f}x | "
              f"{startup.get(name, 0.0):.1f} |")


if __name__ == "__main__":
    main()
