"""What the embedded tasks share: a character tokenizer, a tiny Qwen2-architecture model, and a
supervised warm start that stops when greedy accuracy on a held-out probe lies in a target band.

A task (``CharTask``) says how problems are drawn, written as prompts and target responses, and
graded; ``BandedModelBuilder`` builds a task's model folder once (``save_pretrained``), so the
trainer loads it through the same ``from_pretrained`` path as any real checkpoint. A fixed number of
warm-start steps lands anywhere (the SFT trajectory is chaotic: it depends on the machine's floating
point); the band is what is reproducible, so RL starts with work to do on every machine."""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<pad>", "<eos>", "<unk>"]
PROBE_SEED = 424_242  # the warm start's probe problems: not the RL (1) nor validation (999999) seeds


class CharTask(ABC):
    """A synthetic task over a small character vocabulary."""

    symbols: str  # every character prompts and responses use
    max_new_tokens: int  # enough for the longest target response (greedy probe, validation)

    @abstractmethod
    def problems(self, count: int, seed: int) -> list[Any]:
        """``count`` problems drawn with ``seed``."""

    @abstractmethod
    def prompt(self, problem: Any) -> str:
        """The prompt text."""

    @abstractmethod
    def response(self, problem: Any) -> str:
        """The target response the warm start imitates."""

    @abstractmethod
    def answer(self, problem: Any) -> str:
        """The gold answer column a reward function receives."""

    @abstractmethod
    def correct(self, completion: str, problem: Any) -> bool:
        """Whether a generated response is right (what the probe and the reward count)."""


def build_tokenizer(symbols: str, model_max_length: int = 64):
    """A character-level ``PreTrainedTokenizerFast`` over ``symbols`` plus pad, EOS and unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(symbols))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", model_max_length=model_max_length,
    )


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 3, seed: int = 0, max_positions: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def sft_batch(tokenizer, task: CharTask, batch: list[Any]):
    """Prompt + response + EOS, loss only on the response and EOS (the prompt is given, not predicted)."""
    prompts = [task.prompt(p) for p in batch]
    ids = [tokenizer.encode(q + task.response(p)) + [tokenizer.eos_token_id] for q, p in zip(prompts, batch)]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    for i, (seq, prompt) in enumerate(zip(ids, prompts)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt): len(seq)] = torch.tensor(seq[len(prompt):])  # one token per character
    return input_ids, (input_ids != tokenizer.pad_token_id).long(), labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: CharTask, batch: list[Any]) -> float:
    model.eval()
    enc = tokenizer([task.prompt(p) for p in batch], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.correct(t, p) for t, p in zip(texts, batch)) / len(batch)


@dataclass
class WarmStart:
    """Where a warm start ended: optimizer steps taken and the last probe's greedy accuracy."""

    steps: int
    accuracy: float | None


def warm_start(model, tokenizer, task: CharTask, steps: int, batch_size: int = 128, lr: float = 3e-3,
               seed: int = 0, start_step: int = 0, band: tuple[float, float] | None = None, check_every: int = 20,
               probe: list[Any] | None = None, progress: bool = False) -> WarmStart:
    """Supervised warm start on random problems (disjoint seeds from the RL and validation sets).

    Without ``band`` it takes ``steps`` steps. With ``band = (low, high)`` it measures greedy accuracy
    on ``probe`` every ``check_every`` steps and stops as soon as it lies in the band (``steps`` is
    then the budget). A check that jumps past the band rewinds to the previous check (weights,
    optimizer and schedule restored, so the same trajectory is replayed) and checks after every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short warm-up, so a longer warm start extends the same trajectory.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    bar = _progress(steps) if progress else None
    step, end, accuracy, loss_value = start_step, start_step + steps, None, float("nan")
    every = check_every if band else steps
    while step < end:
        saved = _snapshot(model, opt, sched) if band and every > 1 else None
        model.train()
        for _ in range(min(every, end - step)):
            batch = task.problems(batch_size, seed=10_000 + seed * 100_003 + step)
            input_ids, attention, labels = sft_batch(tokenizer, task, batch)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, loss_value = step + 1, loss.item()
        if band:
            accuracy = greedy_accuracy(model, tokenizer, task, probe)
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


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=0, desc="[espo_lightning] warm start", unit="step", mininterval=2.0,
                file=sys.stderr)


class BandedModelBuilder:
    """Builds a task's tiny model at a path when no checkpoint is there yet (cached afterwards).

    The warm start stops when greedy accuracy on a held-out probe (200 problems, disjoint from the
    training and validation seeds) lies in ``target_accuracy``; a progress bar shows step, loss,
    probe accuracy and time. Subclasses name the task (``task_name``) and make it (``make_task``)."""

    task_name = "task"

    def __init__(self, sft_steps: int, target_accuracy: tuple[float, float] | None, check_every: int,
                 hidden_size: int, num_layers: int, seed: int):
        who = type(self).__name__
        if sft_steps < 0:
            raise ValueError(f"{who}: sft_steps must be >= 0, got {sft_steps}")
        if target_accuracy is not None and not (len(target_accuracy) == 2 and 0 <= target_accuracy[0] <= target_accuracy[1] <= 1):
            raise ValueError(f"{who}: target_accuracy must be [low, high] within [0, 1], got {target_accuracy}")
        if check_every < 1:
            raise ValueError(f"{who}: check_every must be >= 1, got {check_every}")
        self.sft_steps, self.hidden_size, self.num_layers, self.seed = sft_steps, hidden_size, num_layers, seed
        self.target_accuracy = list(target_accuracy) if target_accuracy is not None else None
        self.check_every = check_every

    @abstractmethod
    def make_task(self) -> CharTask:
        """The task this builder warm-starts on."""

    def spec(self) -> dict:
        return {"task": self.task_name, "sft_steps": self.sft_steps, "target_accuracy": self.target_accuracy,
                "check_every": self.check_every, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "seed": self.seed}

    def __call__(self, path: str | os.PathLike) -> None:
        path, who = Path(path), type(self).__name__
        stamp = path / "espo_builder.json"
        if stamp.exists() and json.loads(stamp.read_text()).get("spec", json.loads(stamp.read_text())) == self.spec():
            return
        if path.exists() and any(path.iterdir()) and not stamp.exists():
            raise ValueError(f"{who}: {path} holds files this builder did not write; "
                             "point model_name_or_path elsewhere or remove model_builder")
        start = time.perf_counter()
        task = self.make_task()
        tokenizer = build_tokenizer(task.symbols)
        model = build_model(tokenizer, self.hidden_size, self.num_layers, self.seed)
        band = tuple(self.target_accuracy) if self.target_accuracy is not None else None
        probe = task.problems(200, seed=PROBE_SEED)
        result = warm_start(model, tokenizer, task, self.sft_steps, seed=self.seed, band=band,
                            check_every=self.check_every, probe=probe, progress=self.sft_steps >= 100)
        acc = greedy_accuracy(model, tokenizer, task, probe)
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
        print(f"[espo_lightning] built the embedded {self.task_name} model at {path} in {time.perf_counter() - start:.0f}s: "
              f"{result.steps} warm-start steps, greedy probe accuracy {acc:.0%}{where}")
