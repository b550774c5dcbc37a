"""The embedded default: two-digit addition ("37+45=" -> "82") with a tiny Qwen2-architecture model
and a character tokenizer that this project builds itself, so the quickstart needs no model hub.

The model is warm-started by a short supervised phase until its greedy accuracy on a held-out probe
lies in a target band (default 55-75%), so RL starts well above zero reward with room to improve on
any machine (a fixed step count lands anywhere: the SFT trajectory is chaotic), then saved with
``save_pretrained``: the trainer loads it through the same ``from_pretrained`` path as any
real checkpoint."""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
import time
from pathlib import Path

import torch

from espo_lightning.data.source import PromptSource

SYMBOLS = list("0123456789+=")
PROBE_SEED = 424_242  # the warm start's probe problems: not the RL (1) nor validation (999999) seeds
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


@dataclass
class WarmStart:
    """Where a warm start ended: optimizer steps taken and the last probe's greedy accuracy."""

    steps: int
    accuracy: float | None


def warm_start(model, tokenizer, steps: int, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
               start_step: int = 0, band: tuple[float, float] | None = None, check_every: int = 20,
               probe: list[tuple[int, int]] | None = None, progress: bool = False) -> WarmStart:
    """Supervised warm start on random problems (disjoint seeds from the RL and validation sets).

    Without ``band`` it takes ``steps`` steps. With ``band = (low, high)`` it measures greedy accuracy
    on ``probe`` every ``check_every`` steps and stops as soon as it lies in the band (``steps`` is
    then the budget). The SFT trajectory is chaotic (where a fixed number of steps lands depends on
    the machine's floating point), so the band, not the step count, is what is reproducible. A check
    that jumps past the band rewinds to the previous check (weights, optimizer and schedule restored,
    so the same trajectory is replayed) and checks after every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short warm-up, so a longer warm start extends the same trajectory.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    bar = _progress(steps, start_step) if progress else None
    step, end, accuracy, loss_value = start_step, start_step + steps, None, float("nan")
    every = check_every if band else steps
    while step < end:
        saved = _snapshot(model, opt, sched) if band and every > 1 else None
        model.train()
        for _ in range(min(every, end - step)):
            input_ids, attention, labels = _sft_batch(tokenizer, problems(batch_size, seed=10_000 + seed * 100_003 + step),
                                                      "cpu")
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, loss_value = step + 1, float(loss)
        if band:
            accuracy = greedy_accuracy(model, tokenizer, probe)
            if bar is not None:
                bar.n = step - start_step
                bar.set_postfix(loss=f"{loss_value:.3f}", probe=f"{accuracy:.0%}", refresh=True)
            if band[0] <= accuracy <= band[1]:
                break
            if accuracy > band[1] and saved is not None:  # jumped past the band: replay step by step
                _restore(model, opt, sched, saved)
                step, every = step - every, 1
        elif bar is not None:
            bar.update(step - start_step - bar.n)
    if bar is not None:
        bar.close()
    model.eval()
    return WarmStart(steps=step - start_step, accuracy=accuracy)


def _snapshot(model, opt, sched) -> tuple:
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))


def _restore(model, opt, sched, saved: tuple) -> None:
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])


def _progress(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=0, desc="[espo_lightning] warm start", unit="step", mininterval=2.0,
                file=sys.stderr)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs) -> float:
    model.eval()
    prompts = [f"{a}+{b}=" for a, b in pairs]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == str(a + b) for t, (a, b) in zip(texts, pairs)) / len(pairs)


class AdditionModelBuilder:
    """Builds the embedded tiny model at a path when no checkpoint is there yet (cached afterwards).

    The warm start stops when greedy accuracy on a held-out probe (200 problems, disjoint from the
    training and validation seeds) lies in ``target_accuracy``, so RL starts with work to do on any
    machine; a progress bar shows step, loss, probe accuracy and time.

    Args:
        sft_steps: Budget of supervised warm-start steps (batch 128); all of them when
            ``target_accuracy`` is null.
        target_accuracy: ``[low, high]`` band of probe accuracy at which the warm start stops; null
            trains exactly ``sft_steps`` steps.
        check_every: Steps between probes (after a probe past the band: every step).
        hidden_size: Model width.
        num_layers: Transformer blocks.
        seed: Initialisation and data seed.
    """

    def __init__(self, sft_steps: int = 3000, target_accuracy: tuple[float, float] | None = (0.55, 0.75),
                 check_every: int = 20, hidden_size: int = 128, num_layers: int = 3, seed: int = 0):
        if sft_steps < 0:
            raise ValueError(f"AdditionModelBuilder: sft_steps must be >= 0, got {sft_steps}")
        if target_accuracy is not None and not (len(target_accuracy) == 2 and 0 <= target_accuracy[0] <= target_accuracy[1] <= 1):
            raise ValueError(f"AdditionModelBuilder: target_accuracy must be [low, high] within [0, 1], got {target_accuracy}")
        if check_every < 1:
            raise ValueError(f"AdditionModelBuilder: check_every must be >= 1, got {check_every}")
        self.sft_steps, self.hidden_size, self.num_layers, self.seed = sft_steps, hidden_size, num_layers, seed
        self.target_accuracy = list(target_accuracy) if target_accuracy is not None else None
        self.check_every = check_every

    def spec(self) -> dict:
        return {"task": "addition", "sft_steps": self.sft_steps, "target_accuracy": self.target_accuracy,
                "check_every": self.check_every, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "seed": self.seed}

    def __call__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        stamp = path / "espo_builder.json"
        if stamp.exists() and json.loads(stamp.read_text()).get("spec", json.loads(stamp.read_text())) == self.spec():
            return
        if path.exists() and any(path.iterdir()) and not stamp.exists():
            raise ValueError(f"AdditionModelBuilder: {path} holds files this builder did not write; "
                             "point model_name_or_path elsewhere or remove model_builder")
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, self.hidden_size, self.num_layers, self.seed)
        band = tuple(self.target_accuracy) if self.target_accuracy is not None else None
        result = warm_start(model, tokenizer, self.sft_steps, seed=self.seed, band=band, check_every=self.check_every,
                            probe=problems(200, seed=PROBE_SEED), progress=self.sft_steps >= 100)
        acc = greedy_accuracy(model, tokenizer, problems(200, seed=PROBE_SEED))
        # Write next to the target and rename, so a crash or a second process never sees half a model.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "espo_builder.json").write_text(json.dumps({"spec": self.spec(), "sft_steps_taken": result.steps,
                                                           "probe_accuracy": acc}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        where = "" if band is None else (f", inside the target band {band[0]:.0%}-{band[1]:.0%}" if band[0] <= acc <= band[1]
                                         else f", OUTSIDE the target band {band[0]:.0%}-{band[1]:.0%} (step budget spent)")
        print(f"[espo_lightning] built the embedded addition model at {path} in {time.perf_counter() - start:.0f}s: "
              f"{result.steps} warm-start steps, greedy probe accuracy {acc:.0%}{where}")


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
