"""The embedded default: two-digit addition ("37+45=" -> "82") with a tiny Qwen2-architecture model
and a character tokenizer that this project builds itself, so the quickstart needs no model hub.

The model is warm-started by a short supervised phase so that RL starts well above zero reward
(DESIGN.md section 4: after ~60 s of SFT it answers about 70% of held-out problems), then saved
with ``save_pretrained``: the trainer loads it through the same ``from_pretrained`` path as any
real checkpoint."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from espo_lightning.data.source import PromptSource

SYMBOLS = list("0123456789+=")
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    """A character-level tokenizer (15 symbols) as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", model_max_length=64,
    )


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 3, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def problems(count: int, seed: int, low: int = 10, high: int = 99) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


def _sft_batch(tokenizer, pairs, device):
    """Prompt + answer + EOS, loss only on the answer and EOS (the prompt is given, not predicted)."""
    texts = [f"{a}+{b}={a + b}" for a, b in pairs]
    ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    for i, (seq, (a, b)) in enumerate(zip(ids, pairs)):
        prompt_len = len(f"{a}+{b}=")
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
    attention = (input_ids != tokenizer.pad_token_id).long()
    return input_ids.to(device), attention.to(device), labels.to(device)


def warm_start(model, tokenizer, steps: int, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
               start_step: int = 0) -> None:
    """Supervised warm start on random problems (disjoint seeds from the RL and validation sets)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short warm-up, so a longer warm start extends the same trajectory.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    for step in range(start_step, start_step + steps):
        input_ids, attention, labels = _sft_batch(tokenizer, problems(batch_size, seed=10_000 + seed * 100_003 + step), "cpu")
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs) -> float:
    prompts = [f"{a}+{b}=" for a, b in pairs]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == str(a + b) for t, (a, b) in zip(texts, pairs)) / len(pairs)


class AdditionModelBuilder:
    """Builds the embedded tiny model at a path when no checkpoint is there yet (cached afterwards).

    Args:
        sft_steps: Supervised warm-start steps (batch 128). More steps start RL from higher accuracy.
        hidden_size: Model width.
        num_layers: Transformer blocks.
        seed: Initialisation and data seed.
    """

    def __init__(self, sft_steps: int = 1000, hidden_size: int = 128, num_layers: int = 3, seed: int = 0):
        if sft_steps < 0:
            raise ValueError(f"AdditionModelBuilder: sft_steps must be >= 0, got {sft_steps}")
        self.sft_steps, self.hidden_size, self.num_layers, self.seed = sft_steps, hidden_size, num_layers, seed

    def spec(self) -> dict:
        return {"task": "addition", "sft_steps": self.sft_steps, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "seed": self.seed}

    def __call__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        stamp = path / "espo_builder.json"
        if stamp.exists() and json.loads(stamp.read_text()) == self.spec():
            return
        if path.exists() and any(path.iterdir()) and not stamp.exists():
            raise ValueError(f"AdditionModelBuilder: {path} holds files this builder did not write; "
                             "point model_name_or_path elsewhere or remove model_builder")
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, self.hidden_size, self.num_layers, self.seed)
        warm_start(model, tokenizer, self.sft_steps, seed=self.seed)
        acc = greedy_accuracy(model, tokenizer, problems(200, seed=999_999))
        # Write next to the target and rename, so a crash or a second process never sees half a model.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "espo_builder.json").write_text(json.dumps(self.spec()))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        print(f"[espo_lightning] built the embedded addition model at {path} in "
              f"{time.perf_counter() - start:.0f}s (greedy accuracy after warm start: {acc:.0%})")


class AdditionSource(PromptSource):
    """Synthetic two-digit addition prompts with their answers (column ``answer``).

    Args:
        num_problems: How many distinct problems.
        seed: Problem seed; use different seeds for training and validation sets.
        low: Smallest operand.
        high: Largest operand.
    """

    def __init__(self, num_problems: int = 2000, seed: int = 1, low: int = 10, high: int = 99):
        if num_problems < 1:
            raise ValueError(f"AdditionSource: num_problems must be >= 1, got {num_problems}")
        if not 0 <= low <= high:
            raise ValueError(f"AdditionSource: need 0 <= low <= high, got low={low}, high={high}")
        self.num_problems, self.seed, self.low, self.high = num_problems, seed, low, high

    def rows(self) -> list[dict]:
        return [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
                for a, b in problems(self.num_problems, self.seed, self.low, self.high)]
