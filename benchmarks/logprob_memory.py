"""Peak extra memory of scoring sampled tokens from logits: chunked (espo_lightning.policy.logprobs) vs naive.

    python benchmarks/logprob_memory.py [--tokens 2048] [--vocab 151936]

Prints a markdown table of each variant's peak memory above the resident logits, as a multiple of
the logits tensor's own size (V = 151,936 is Qwen's vocabulary).

How memory is measured. torch's CPU allocations bypass Python's allocator, so ``tracemalloc`` does
not see them, and ``torch.cuda`` statistics do not exist on CPU. We use the kernel's own peak
resident-set counter instead:

1. every variant runs in a fresh subprocess (no allocator state or caches from another variant);
2. the child builds the logits, runs the variant once on a tiny input (so lazily initialised
   kernels and thread pools are not counted), then resets the kernel's peak-RSS watermark by writing
   ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and reads the current ``VmRSS`` as the baseline;
3. it runs the variant and reads ``VmHWM`` (the peak RSS since the reset): extra = VmHWM - baseline.

This is exact for the allocations that matter: glibc serves blocks above its mmap threshold (at most
32 MiB) with ``mmap`` and unmaps them on free, so every large tensor shows up in RSS while it lives
and disappears when freed, and every tensor the variants allocate is written (so its pages are
resident). The "control" row, which allocates exactly one fp32 copy of the logits, checks the
method: it must read 1.00x for fp32 logits.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _variants():
    import torch

    from espo_lightning.policy.logprobs import token_logprobs, token_logprobs_and_entropy

    def naive_scoring(logits, targets):
        with torch.no_grad():
            logp_all = logits.float().log_softmax(-1)  # [B, T, V] fp32
            logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def chunked_scoring(logits, targets):
        return token_logprobs_and_entropy(logits, targets)

    def naive_grad(logits, targets):
        leaf = logits.requires_grad_()
        logp = leaf.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp.sum().backward()

    def chunked_grad(logits, targets):
        leaf = logits.requires_grad_()
        token_logprobs(leaf, targets).sum().backward()

    def control(logits, targets):
        return torch.ones(logits.shape, dtype=torch.float32)

    return {
        "control": control,
        "naive_scoring": naive_scoring,
        "chunked_scoring": chunked_scoring,
        "naive_grad": naive_grad,
        "chunked_grad": chunked_grad,
    }


def child(variant: str, dtype_name: str, tokens: int, vocab: int) -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    run = _variants()[variant]
    small = torch.randn(1, 4, vocab).to(dtype)
    run(small, torch.zeros(1, 4, dtype=torch.long))  # warm up kernels and thread pools
    del small
    logits = torch.empty(1, tokens, vocab, dtype=dtype).uniform_(-8.0, 8.0)  # [1, T, V], pages touched
    targets = torch.randint(0, vocab, (1, tokens))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark to the current RSS
    baseline = _status_kib("VmRSS")
    result = run(logits, targets)
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"extra_bytes": (peak - baseline) * 1024, "logits_bytes": logits.numel() * logits.element_size()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="B*T positions scored (B = 1)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.tokens, args.vocab)
        return

    rows = [
        ("control: one fp32 copy of the logits", "control", "float32"),
        ("naive scoring: fp32 log_softmax + entropy", "naive_scoring", "float32"),
        ("chunked scoring: token_logprobs_and_entropy", "chunked_scoring", "float32"),
        ("naive scoring: fp32 log_softmax + entropy", "naive_scoring", "bfloat16"),
        ("chunked scoring: token_logprobs_and_entropy", "chunked_scoring", "bfloat16"),
        ("naive log-probs, forward + backward", "naive_grad", "float32"),
        ("chunked token_logprobs, forward + backward", "chunked_grad", "float32"),
        ("naive log-probs, forward + backward", "naive_grad", "bfloat16"),
        ("chunked token_logprobs, forward + backward", "chunked_grad", "bfloat16"),
    ]
    print(f"B*T = {args.tokens} positions, V = {args.vocab}; "
          "peak RSS above the resident logits, fresh process per row\n")
    print("| variant | logits dtype | logits size (MiB) | peak extra (MiB) | x logits size |")
    print("|---|---|---:|---:|---:|")
    for label, variant, dtype in rows:
        out = subprocess.run(
            [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
             "--child", variant, dtype],
            check=True, capture_output=True, text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        size, extra = result["logits_bytes"], result["extra_bytes"]
        print(f"| {label} | {dtype} | {size / 2**20:.0f} | {extra / 2**20:.0f} | {extra / size:.2f}x |", flush=True)
    print("\nThe backward rows include the logits gradient itself (1.00x, in the logits dtype), "
          "which any method needs.")


if __name__ == "__main__":
    main()
