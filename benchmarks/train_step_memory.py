"""Peak memory and time of one training step (forward + backward) at V = 151,936: the fused LM head
against the logits path, from 2k to 32k tokens per micro-batch.

    python benchmarks/train_step_memory.py [--tokens 2048 4096 8192 16384 32768] [--repeats 3]
    python benchmarks/train_step_memory.py --first-update [--tokens 2048 8192]

``--first-update`` compares the two ways of running a rollout's first, on-policy update on the
fused head: a no-grad scoring pass for the old log-probs and entropies followed by the step (what
every update of a rollout with several passes still does before the rollout's first step), and the
step scoring itself (``TokenScorer.logprobs_with_entropy``: the entropies come from the step's own
chunks of logits, the old log-probs are its own log-probs).

The model is a random, tiny-width one (``espo_lightning.tasks.wide_vocab``: hidden size 16, one
block, tied embeddings), so the numbers are those of what scales with V x T (logits, softmax
statistics, their gradients), not of the transformer. A step is what ``training_step`` does per
micro-batch: the policy's log-probs of the completion tokens (``TokenScorer.logprobs``), a
GRPO-style loss on them, and the backward into every parameter. Micro-batches are rows of 1,024
tokens (16 prompt + 1,008 completion tokens).

Memory is the peak RSS above the resident model and inputs, measured as in
``benchmarks/logprob_memory.py`` (a fresh process per row, the kernel's peak-RSS watermark reset
after a warm-up step). Time is the median of ``--repeats`` steps in that process. A logits-path row
whose fp32 logits alone would pass ``--max-gib`` is not run (this machine has 24 GiB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from logprob_memory import _status_kib  # noqa: E402

ROW_TOKENS, PROMPT_TOKENS = 1024, 16
VOCAB = 151_936


def child(model_dir: str, path: str, tokens: int, repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from espo_lightning.rollout.tensors import build_rollout_batch
    from espo_lightning.policy.scoring import TokenScorer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    scorer = TokenScorer(fused_head=path != "logits")
    rows = max(1, tokens // ROW_TOKENS)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, VOCAB, (rows, PROMPT_TOKENS), generator=gen).tolist()
    completions = torch.randint(3, VOCAB, (rows, ROW_TOKENS - PROMPT_TOKENS), generator=gen).tolist()
    advantages = torch.randn(rows, generator=gen)
    batch = build_rollout_batch(prompts, completions, 0, advantages, torch.zeros(rows), None, 1.0)
    weights = (advantages.unsqueeze(1) * batch.completion_mask) / batch.completion_mask.sum()

    def step():
        if path == "scored-then-step":
            scorer.logprobs_and_entropy(model, batch)
        if path == "self-scoring":
            logp, _ = scorer.logprobs_with_entropy(model, batch, with_entropy=True)
        else:
            logp = scorer.logprobs(model, batch)
        (-(logp * weights).sum()).backward()
        model.zero_grad(set_to_none=True)

    small = batch
    batch = batch.select(torch.tensor([0]))  # warm-up on one row: kernels, thread pools, allocator
    step()
    batch = small
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - baseline) * 1024, "seconds": statistics.median(times)}))


def _run_child(args, model_dir: str, path: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--child",
                          str(model_dir), path, str(tokens)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_update_table(args, model_dir) -> None:
    print(f"V = {VOCAB}, hidden 16, rows of {ROW_TOKENS} tokens, fp32, fused head; peak RSS above the resident "
          f"model and inputs, median of {args.repeats} steps, fresh process per cell\n")
    print("| tokens per micro-batch | later update: peak MiB, s | first update, scoring pass + step: peak MiB, s "
          "| first update scoring itself: peak MiB, s | time saved |")
    print("|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        plain, scored, own = (_run_child(args, model_dir, path, tokens)
                              for path in ("fused", "scored-then-step", "self-scoring"))
        cell = lambda r: f"{r['extra_bytes'] / 2**20:.0f}, {r['seconds']:.2f}"  # noqa: E731
        print(f"| {tokens} | {cell(plain)} | {cell(scored)} | {cell(own)} | "
              f"{1 - own['seconds'] / scored['seconds']:.0%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=6.0,
                        help="skip logits-path rows whose fp32 logits alone exceed this")
    parser.add_argument("--first-update", action="store_true",
                        help="compare scoring-then-step with the self-scoring first update (fused head)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.repeats)
        return

    from espo_lightning.tasks.wide_vocab import build_wide_vocab_model

    model_dir = build_wide_vocab_model(Path(tempfile.mkdtemp()) / "wide-vocab")
    if args.first_update:
        return first_update_table(args, model_dir)
    print(f"V = {VOCAB}, hidden 16, rows of {ROW_TOKENS} tokens, fp32 weights; peak RSS above the "
          f"resident model and inputs, median of {args.repeats} steps, fresh process per row\n")
    print("| tokens per micro-batch | fp32 logits (MiB) | fused peak (MiB) | logits-path peak (MiB) "
          "| fused s | logits-path s | fused / logits time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        logits_mib = tokens * VOCAB * 4 / 2**20
        result = {}
        for path in ("fused", "logits"):
            if path == "logits" and logits_mib / 1024 > args.max_gib:
                continue
            result[path] = _run_child(args, model_dir, path, tokens)
        fused, logits = result["fused"], result.get("logits")
        cells = [f"{tokens}", f"{logits_mib:.0f}", f"{fused['extra_bytes'] / 2**20:.0f}",
                 f"{logits['extra_bytes'] / 2**20:.0f}" if logits else f"not run (> {args.max_gib:g} GiB)",
                 f"{fused['seconds']:.2f}", f"{logits['seconds']:.2f}" if logits else "-",
                 f"{fused['seconds'] / logits['seconds']:.2f}x" if logits else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
