"""Padding-free micro-batches (``model.packing``) against padded ones, on a long-tailed length
distribution: the time of the old-policy scoring pass and of one optimizer step, the tokens the
transformer processes (real and pad), and the peak RSS, per layout:

- ``padded``: today's default: rows sorted by length, packed greedily up to ``--budget`` padded
  tokens (rows x width), each micro-batch trimmed to its own longest prompt + completion;
- ``packed``: ``model.packing``: the same planner counting real tokens up to ``--budget``, each
  micro-batch one ``[1, N]`` sequence (per-row SDPA on the CPU);
- ``trl``: TRL's layout: micro-batches of ``--trl-rows`` rows in rollout order, each one rectangle as
  wide as its longest prompt plus its longest completion, scored as TRL's ``GRPOTrainer`` scores
  it (``--trl-head``): ``all`` (the default): TRL 1.16's fused LM head (``add_fused_lm_head``)
  off Triton devices, this CPU included, projects every position of the rectangle (prompt, pad and
  completion) and keeps the completion window's; ``valid``: as it does on CUDA with Triton, only
  the valid completion positions.

    python benchmarks/packing.py [--repeats 3] [--responses 64] [--budget 8192] [--trl-rows 8]
                                 [--trl-head all|valid]

The model is Qwen3-shaped (hidden 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 768) with the real
vocabulary of 151,936 and a tied head, run through this project's fused LM head kernel in every
layout (the same chunked kernel, so the layouts differ only in which positions reach it): in
``padded`` and ``packed`` only valid completion positions reach it, so the head's cost is the same
in both and the pad fraction bounds only the transformer's share of the step. The minibatch:
``--responses`` responses, prompts uniform in 64-256 tokens, completions log-normal with median 256
(sigma 1), capped at 2,048: the shape of reasoning traces at 1/8 of the paper's 16k. One step =
every micro-batch's forward + backward of a GRPO loss + AdamW. Each (repeat, layout) runs in a fresh
process (peak RSS = VmHWM after the model and optimizer state are built, minus the RSS then);
layouts are interleaved within each repeat, and the table shows medians. The bound is the speed-up
that removing the pad fraction alone would allow if every FLOP were per processed token, 1 / (1 -
pad). Once, after the first repeat, the fused head alone runs on the valid completion positions (the
head's work, the same in ``padded`` and ``packed``), and the last line splits each step into the
head and the rest, the part packing can shrink.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from logprob_memory import _status_kib  # noqa: E402

VOCAB = 151_936
LAYOUTS = ("padded", "packed", "trl")


def lengths(responses: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(64, 257, (responses,), generator=gen)
    normal = torch.randn(responses, generator=gen, dtype=torch.float64)
    completions = torch.exp(math.log(256) + normal).round().clamp(1, 2048).long()
    return prompts, completions


def _model():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=4096, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).float().train()


def _plan(layout: str, batch, budget: int, trl_rows: int):
    import torch

    from espo_lightning.training.micro_batches import plan_micro_batches

    if layout == "trl":
        return list(torch.arange(len(batch)).split(trl_rows))
    lp = batch.prompt_length
    return plan_micro_batches(batch.attention_mask[:, :lp].sum(-1), batch.attention_mask[:, lp:].sum(-1), None,
                              budget, packed=layout == "packed")


def trl_head_logprobs(model, micro, rows: int, with_entropy: bool):
    """TRL's fused head off Triton devices: every position of the ``[B, T]`` rectangle reaches the
    head (labels clamped, as ``add_fused_lm_head`` does when it cannot compact), and the completion
    window's log-probs (and entropies) come back as ``[B, Lc]``, 0 off the completion mask."""
    from espo_lightning.policy.lm_head import _FusedHeadLogprobs, _swapped_forward
    from espo_lightning.policy.scoring import position_ids

    head = model.get_output_embeddings()
    mask = micro.completion_mask
    b, lc = mask.shape
    result = {}

    def head_forward(hidden):  # [B, T, H] -> [B, T - 1]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B (T - 1), H] every position
        targets = micro.input_ids[:, 1:].reshape(-1)
        logp, entropy = _FusedHeadLogprobs.apply(h, head.weight, head.bias, targets, float(micro.temperature),
                                                 rows, with_entropy)
        off = ~mask.bool()
        result["logp"] = logp.view(b, -1)[:, -lc:].masked_fill(off, 0.0)  # [B, Lc]: TRL keeps the last Lc
        result["entropy"] = entropy.view(b, -1)[:, -lc:].masked_fill(off, 0.0) if with_entropy else None
        return result["logp"]

    with _swapped_forward(head, head_forward):
        model(input_ids=micro.input_ids, attention_mask=micro.attention_mask,
              position_ids=position_ids(micro.attention_mask), logits_to_keep=0, use_cache=False)
    return result["logp"], result["entropy"]


def _batch(responses: int):
    import torch

    from espo_lightning.rollout.tensors import build_rollout_batch

    prompt_lengths, completion_lengths = lengths(responses)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=gen).tolist() for n in prompt_lengths]
    completions = [torch.randint(3, VOCAB, (int(n),), generator=gen).tolist() for n in completion_lengths]
    return build_rollout_batch(prompts, completions, 0, torch.randn(responses, generator=gen),
                               torch.zeros(responses), None, 1.0)


def head_child(responses: int, budget: int) -> None:
    """The fused head alone on the valid completion positions of the packed plan's micro-batches (its
    work in ``padded`` and ``packed`` alike, which packing cannot remove): no grad with entropies
    (scoring), then forward + backward (its share of a step), on random hidden states."""
    import torch

    from espo_lightning.policy.lm_head import _FusedHeadLogprobs
    from espo_lightning.policy.scoring import TokenScorer

    batch = _batch(responses)
    model = _model()
    head, chunk = model.get_output_embeddings(), TokenScorer()._rows(model)
    gen = torch.Generator().manual_seed(2)
    counts = [int(batch.completion_mask[rows].sum()) for rows in _plan("packed", batch, budget, 0)]
    hidden = [torch.randn(n, head.weight.shape[1], generator=gen) for n in counts]
    targets = [torch.randint(0, VOCAB, (n,), generator=gen) for n in counts]
    start = time.perf_counter()
    with torch.no_grad():
        for h, t in zip(hidden, targets):
            _FusedHeadLogprobs.apply(h, head.weight, head.bias, t, 1.0, chunk, True)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    for h, t in zip(hidden, targets):
        logp, _ = _FusedHeadLogprobs.apply(h.requires_grad_(), head.weight, head.bias, t, 1.0, chunk, False)
        logp.sum().backward()
    step_s = time.perf_counter() - start
    print(json.dumps({"layout": "head", "score_s": score_s, "step_s": step_s, "positions": sum(counts)}))


def child(layout: str, responses: int, budget: int, trl_rows: int, trl_head: str = "all") -> None:
    import torch

    from espo_lightning.losses import GRPOLoss
    from espo_lightning.losses.base import Normalizer
    from espo_lightning.policy.scoring import TokenScorer

    batch = _batch(responses)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # AdamW's state and the gradients exist before the measurement
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scorer, loss_fn = TokenScorer(packing=layout == "packed"), GRPOLoss()
    score, logprobs = scorer.logprobs_and_entropy, scorer.logprobs
    if layout == "trl" and trl_head == "all":
        chunk = scorer._rows(model)  # the scorer's chunk of positions: the same kernel as the other layouts
        score = torch.no_grad()(lambda m, micro: trl_head_logprobs(m, micro, chunk, True))
        logprobs = lambda m, micro: trl_head_logprobs(m, micro, chunk, False)[0]  # noqa: E731
    plan = _plan(layout, batch, budget, trl_rows)
    micros = [batch.select(rows).trimmed() for rows in plan]
    real = int(batch.attention_mask.sum())
    processed = sum(m.input_ids.numel() for m in micros) if layout != "packed" else real
    valid = int(batch.completion_mask.sum())
    head = sum(m.input_ids[:, 1:].numel() for m in micros) if layout == "trl" and trl_head == "all" else valid
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")

    start = time.perf_counter()
    with torch.no_grad():
        for micro, rows in zip(micros, plan):
            lp, ent = score(model, micro)
            width = lp.shape[1]
            batch.old_logprobs[rows, :width], batch.entropies[rows, :width] = lp, ent
    score_s = time.perf_counter() - start
    micros = [batch.select(rows).trimmed() for rows in plan]  # with their old log-probs

    start = time.perf_counter()
    counts = Normalizer(*Normalizer.of(batch.completion_mask))
    for micro in micros:
        logp = logprobs(model, micro)
        loss, _ = loss_fn(logprobs=logp, old_logprobs=micro.old_logprobs, advantages=micro.advantages,
                          mask=micro.completion_mask, entropies=micro.entropies, normalizer=counts)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"layout": layout, "score_s": score_s, "step_s": step_s, "real": real,
                      "pad": processed - real, "head": head, "micro_batches": len(plan),
                      "peak_mib": (peak - baseline) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--budget", type=int, default=8192, help="tokens per micro-batch (padded / packed)")
    parser.add_argument("--trl-rows", type=int, default=8, help="rows per micro-batch of the TRL layout")
    parser.add_argument("--trl-head", choices=("all", "valid"), default="all",
                        help="positions of the TRL layout that reach the head: all (TRL off Triton, this CPU) "
                             "or valid (TRL on CUDA with Triton)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--child", choices=LAYOUTS + ("head",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "head":
        return head_child(args.responses, args.budget)
    if args.child:
        return child(args.child, args.responses, args.budget, args.trl_rows, args.trl_head)

    def run(layout: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", layout, "--responses", str(args.responses),
                              "--budget", str(args.budget), "--trl-rows", str(args.trl_rows),
                              "--trl-head", args.trl_head], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {layout: [] for layout in args.layouts}
    heads: list[dict] = []
    for repeat in range(args.repeats):
        for layout in args.layouts:  # interleaved: machine load drifts over a run
            runs[layout].append(run(layout))
            print(f"repeat {repeat + 1}/{args.repeats} {layout}: {runs[layout][-1]}", file=sys.stderr, flush=True)
        if repeat == 0 and {"padded", "packed"} <= set(args.layouts):
            heads.append(run("head"))  # once: the share of the step that no layout of the body removes
            print(f"head alone: {heads[-1]}", file=sys.stderr, flush=True)

    report(args, runs, heads)


def report(args, runs: dict[str, list[dict]], heads: list[dict]) -> None:
    """The table (and the head's line) from the children's JSON lines."""
    prompts, completions = lengths(args.responses)
    print(f"{args.responses} responses, prompts 64-256 (mean {prompts.float().mean():.0f}), completions log-normal "
          f"median 256 cap 2,048 (mean {completions.float().mean():.0f}, max {int(completions.max())}); "
          f"budget {args.budget} tokens, TRL rows {args.trl_rows} (head over {args.trl_head} positions); "
          f"{args.repeats} interleaved repeats, medians; "
          f"{platform.machine()}, torch threads default")
    med = {layout: {k: statistics.median(r[k] for r in rs) for k in ("score_s", "step_s", "peak_mib")}
           for layout, rs in runs.items()}
    base = "packed" if "packed" in med else args.layouts[0]
    print("| layout | micro-batches | real tokens | pad tokens | pad fraction | bound 1/(1-pad) | head positions "
          f"| scoring s | step s | peak RSS MiB | scoring vs {base} | step vs {base} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, rs in runs.items():
        r, m = rs[0], med[layout]
        pad = r["pad"] / (r["real"] + r["pad"])
        print(f"| {layout} | {r['micro_batches']} | {r['real']:,} | {r['pad']:,} | {pad:.2f} | {1 / (1 - pad):.2f}x "
              f"| {r['head']:,} | {m['score_s']:.1f} | {m['step_s']:.1f} | {m['peak_mib']:.0f} "
              f"| {m['score_s'] / med[base]['score_s']:.2f}x | {m['step_s'] / med[base]['step_s']:.2f}x |")
    if heads and {"padded", "packed"} <= set(med):  # what packing can and cannot remove
        head, padded = heads[0], runs["padded"][0]
        pad = padded["pad"] / (padded["real"] + padded["pad"])
        step, packed = med["padded"]["step_s"], med["packed"]["step_s"]
        tokens_only = step / (head["step_s"] + (step - head["step_s"]) * (1 - pad))
        print(f"\nThe fused head alone on the {head['positions']:,} valid completion positions (the same work in "
              f"padded and packed; one run): scoring {head['score_s']:.1f} s, step {head['step_s']:.1f} s, "
              f"{head['step_s'] / step:.0%} of padded's step. The rest of the step (transformer, loss, AdamW): "
              f"{step - head['step_s']:.1f} s padded, {packed - head['step_s']:.1f} s packed. Had that rest scaled "
              f"with tokens alone, removing the pad fraction {pad:.2f} would give {tokens_only:.2f}x; packed gives "
              f"{step / packed:.2f}x, {step / packed / (1 / (1 - pad)):.0%} of 1 / (1 - pad) = {1 / (1 - pad):.2f}x.")

if __name__ == "__main__":
    main()
