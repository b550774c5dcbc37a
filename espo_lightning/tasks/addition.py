"""The embedded default: two-digit addition ("37+45=" -> "82") with a tiny Qwen2-architecture model
and a character tokenizer that this project builds itself, so the quickstart needs no model hub.

The model is warm-started until its greedy accuracy on a held-out probe lies in a target band
(default 55-75%), so RL starts well above zero reward with room to improve on any machine (see
``espo_lightning.tasks.warm_start``)."""
from __future__ import annotations

import random

from espo_lightning.data.source import PromptSource
from espo_lightning.tasks.warm_start import BandedModelBuilder, CharTask


def problems(count: int, seed: int, low: int = 10, high: int = 99) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


class AdditionTask(CharTask):
    """``a+b=`` -> ``a+b`` written out (two or three characters)."""

    symbols = "0123456789+="
    max_new_tokens = 4

    def problems(self, count: int, seed: int) -> list[tuple[int, int]]:
        return problems(count, seed)

    def prompt(self, problem: tuple[int, int]) -> str:
        return f"{problem[0]}+{problem[1]}="

    def response(self, problem: tuple[int, int]) -> str:
        return str(sum(problem))

    def answer(self, problem: tuple[int, int]) -> str:
        return str(sum(problem))

    def correct(self, completion: str, problem: tuple[int, int]) -> bool:
        return completion.strip() == self.answer(problem)


class AdditionModelBuilder(BandedModelBuilder):
    """Builds the embedded tiny addition model at a path when no checkpoint is there yet (cached
    afterwards), warm-started into a band of greedy probe accuracy.

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

    task_name = "addition"

    def __init__(self, sft_steps: int = 3000, target_accuracy: tuple[float, float] | None = (0.55, 0.75),
                 check_every: int = 20, hidden_size: int = 128, num_layers: int = 3, seed: int = 0):
        super().__init__(sft_steps, target_accuracy, check_every, hidden_size, num_layers, seed)

    def make_task(self) -> AdditionTask:
        return AdditionTask()


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
