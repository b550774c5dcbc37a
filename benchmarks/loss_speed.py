"""Forward + backward time of the policy losses at the trainer's size, as a markdown table.

    python benchmarks/loss_speed.py [--batch 256] [--seq-len 4096] [--repeats 15] [--threads N]

Inputs mimic one minibatch: right-padded responses of random length in [T/4, T], per-response
advantages from group-normalised 0/1 rewards (G = 8), old-policy entropies, and current log-probs
a few 1e-3 away from the old ones so that the narrow GSPO / ESPO clips bind on some groups.

ESPO is timed the way the trainer calls it (group ids precomputed once per rollout by
``prepare()`` and passed to every ``forward``) and, for reference, with the grouping computed inside
``forward``; ``prepare()`` alone is timed too. Every round runs each variant once, in the same
order, so that drifts in machine load hit all of them alike; the table reports the median over
rounds and the ratio to GSPO. Uses torch's default thread count unless ``--threads`` is given (on a
machine shared with other jobs, one thread gives steadier numbers: a multi-threaded op waits for
its slowest thread, and a descheduled thread costs a whole scheduler tick).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espo_lightning.rollout.advantages import group_advantages  # noqa: E402
from espo_lightning.losses import CISPOLoss, ESPOLoss, GMPOLoss, GRPOLoss, GSPOLoss  # noqa: E402


def make_batch(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=gen)
    mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T] right padding
    old = -torch.rand(batch, seq_len, generator=gen).pow(3) * 6  # [B, T] mostly confident tokens
    logp = old + 3e-3 * torch.randn(batch, seq_len, generator=gen)
    entropies = torch.empty(batch, seq_len).exponential_(2.0, generator=gen)  # [B, T] nats
    rewards = (torch.rand(batch, generator=gen) < 0.5).float()
    return dict(
        logprobs=logp, old_logprobs=old, advantages=group_advantages(rewards, 8), mask=mask, entropies=entropies
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_batch(args.batch, args.seq_len)
    espo = ESPOLoss(vocab_size=151_936)
    group_ids = espo.prepare(data["entropies"], data["mask"])

    logp = data["logprobs"].requires_grad_()

    def fwd_bwd(loss_fn, **extra):
        def run():
            logp.grad = None
            loss, _ = loss_fn(**data, **extra)
            loss.backward()
        return run

    variants = {
        "GSPOLoss": fwd_bwd(GSPOLoss()),
        "GRPOLoss": fwd_bwd(GRPOLoss()),
        "GRPOLoss (DAPO: token_mean, eps_high 0.28)": fwd_bwd(
            GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean")
        ),
        "CISPOLoss": fwd_bwd(CISPOLoss()),
        "GMPOLoss": fwd_bwd(GMPOLoss()),
        "ESPOLoss (group_ids from prepare, as the trainer calls it)": fwd_bwd(espo, group_ids=group_ids),
        "ESPOLoss (grouping inside forward)": fwd_bwd(espo),
        "ESPOLoss.prepare alone (once per rollout)": lambda: espo.prepare(data["entropies"], data["mask"]),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 2):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_ >= 2:  # the first two rounds warm up allocator and caches
                times[name].append(elapsed * 1e3)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["GSPOLoss"]
    print(f"B={args.batch}, T={args.seq_len}, float32, {int(data['mask'].sum())} valid tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds\n")
    print("| variant | forward+backward median (ms) | min (ms) | vs GSPO |")
    print("|---|---:|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} | {min(times[name]):.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
