"""Optimizer state of a LoRA run against a full fine-tune (issue 29): the bytes AdamW holds after one
real optimizer step, on the quickstart's addition model and on a Qwen3-1.7B-shaped model with random
weights built in memory.

Each side builds the model, wraps it with ``model.lora``'s settings (r = 16 on every linear layer,
``espo_lightning.policy.lora.wrap_policy``) or not, hands the trainable parameters to AdamW, takes
one step on a real loss and sums the bytes of ``optimizer.state``. The 1.7B shape's full fine-tune
would need 4 x 6.9 GB (weights, gradients, two moments) in fp32, more than this 24 GiB machine
gives a benchmark beside the model itself, so there its state is built from the parameter shapes on
the meta device (exactly AdamW's two fp32 moments and a step counter per parameter) and said so in
the table; the LoRA side of the 1.7B shape is a real step on a bf16 base.

    python benchmarks/lora_memory.py
"""
from __future__ import annotations

import argparse
import time

import torch

MIB = 2**20


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def one_step(model, ids: torch.Tensor) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    return optimizer


def adamw_state_from_shapes(model) -> int:
    """AdamW (fp32 moments, not fused, no amsgrad): exp_avg and exp_avg_sq of each parameter's
    shape in fp32, and a 0-d fp32 step."""
    return sum(2 * p.numel() * 4 + 4 for p in model.parameters() if p.requires_grad)


def lora(model):
    from espo_lightning.policy.lora import LoraSettings, init_adapters, wrap_policy

    wrapped = wrap_policy(model, LoraSettings(r=16, alpha=32, target_modules="all-linear"))
    init_adapters(wrapped)
    return wrapped


def rows(name: str, build, vocab: int, measure_full: bool) -> list[tuple]:
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    out = []
    if measure_full:
        start = time.perf_counter()
        full = one_step(build(torch.float32), ids)
        out.append((name, "full fine-tune", state_bytes(full), "measured", time.perf_counter() - start))
        del full
    else:
        with torch.device("meta"):
            shapes = build(torch.float32)
        out.append((name, "full fine-tune", adamw_state_from_shapes(shapes), "from shapes (meta)", 0.0))
    start = time.perf_counter()
    model = lora(build(torch.float32 if measure_full else torch.bfloat16))
    optimizer = one_step(model, ids)
    out.append((name, "LoRA r = 16, all-linear", state_bytes(optimizer), "measured", time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-1p7b", action="store_true", help="only the quickstart model (seconds)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    from espo_lightning.tasks.addition import AdditionTask
    from espo_lightning.tasks.warm_start import build_tokenizer

    vocab = len(build_tokenizer(AdditionTask().symbols))
    # The quickstart's model: AdditionModelBuilder's defaults (3 layers, width 128).
    addition = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                           tie_word_embeddings=True)
    qwen3_1p7b = Qwen3Config(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                             max_position_embeddings=4096)

    def builder(config):
        def build(dtype):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        return build

    table = rows("quickstart (addition, 3 x 128)", builder(addition), vocab, measure_full=True)
    if not args.skip_1p7b:
        table += rows("Qwen3-1.7B shape (random)", builder(qwen3_1p7b), 151_936, measure_full=False)
    print("| model | training | AdamW state | how | s | LoRA / full |")
    print("|---|---|---:|---|---:|---:|")
    for i in range(0, len(table), 2):
        full, low = table[i], table[i + 1]
        for row in (full, low):
            ratio = f"{row[2] / full[2]:.2%}" if row is low else ""
            print(f"| {row[0]} | {row[1]} | {row[2] / MIB:,.2f} MiB | {row[3]} | {row[4]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
