"""The embedded long-response task: chained addition with the working written out, the shape of a
reasoning trace ("12+34+56=" -> "12+34=46,46+56=102", 18 characters for three operands).

Most response tokens are predictable: operands copied from the prompt or from the response's own
previous result, and the ``+ = ,`` format. A few are decisive: the digits of each partial sum, where
the model is unsure and the answer is won or lost. That mix is what entropy grouping (ESPO) is
about, and what a sequence-level ratio (GSPO) and a per-token ratio (GRPO) treat differently. Only the
final answer is rewarded (``espo_lightning.rewards.last_number_match``), as with math data."""
from __future__ import annotations

import random

from espo_lightning.data.source import PromptSource
from espo_lightning.rewards.exact import last_number_match
from espo_lightning.tasks.warm_start import BandedModelBuilder, CharTask

def chains(count: int, seed: int, operands: int = 3, low: int = 10, high: int = 99) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randint(low, high) for _ in range(operands)) for _ in range(count)]


def worked(chain: tuple[int, ...]) -> str:
    """``12+34=46,46+56=102``: one step per further operand, each starting from the last result."""
    steps, total = [], chain[0]
    for x in chain[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ",".join(steps)


class ChainTask(CharTask):
    """Chained addition of ``operands`` numbers in ``[low, high]``, working written out."""

    symbols = "0123456789+=,"

    def __init__(self, operands: int = 3, low: int = 10, high: int = 99):
        self.operands, self.low, self.high = operands, low, high
        self.max_new_tokens = len(worked((high,) * operands)) + 2  # the longest chain, plus slack

    def problems(self, count: int, seed: int) -> list[tuple[int, ...]]:
        return chains(count, seed, self.operands, self.low, self.high)

    def prompt(self, problem: tuple[int, ...]) -> str:
        return "+".join(map(str, problem)) + "="

    def response(self, problem: tuple[int, ...]) -> str:
        return worked(problem)

    def answer(self, problem: tuple[int, ...]) -> str:
        return str(sum(problem))

    def correct(self, completion: str, problem: tuple[int, ...]) -> bool:
        return last_number_match(completions=[completion], answer=[self.answer(problem)])[0] == 1.0


class ChainModelBuilder(BandedModelBuilder):
    """Builds the embedded chained-addition model at a path when no checkpoint is there yet (cached
    afterwards), warm-started into a band of greedy probe accuracy (final answer right).

    Args:
        sft_steps: Budget of supervised warm-start steps (batch 128); all of them when
            ``target_accuracy`` is null.
        target_accuracy: ``[low, high]`` band of probe accuracy at which the warm start stops; null
            trains exactly ``sft_steps`` steps.
        check_every: Steps between probes (after a probe past the band: every step).
        operands: Numbers per problem (responses are about ``9 * (operands - 1)`` characters).
        hidden_size: Model width.
        num_layers: Transformer blocks.
        seed: Initialisation and data seed.
    """

    task_name = "chain"

    def __init__(self, sft_steps: int = 4000, target_accuracy: tuple[float, float] | None = (0.4, 0.6),
                 check_every: int = 25, operands: int = 3, hidden_size: int = 128, num_layers: int = 3, seed: int = 0):
        if operands < 2:
            raise ValueError(f"ChainModelBuilder: operands must be >= 2, got {operands}")
        self.operands = operands
        super().__init__(sft_steps, target_accuracy, check_every, hidden_size, num_layers, seed)

    def make_task(self) -> ChainTask:
        return ChainTask(self.operands)

    def spec(self) -> dict:
        return {**super().spec(), "operands": self.operands}


class ChainSource(PromptSource):
    """Chained-addition prompts (``12+34+56=``) with their final answers (column ``answer``).

    Args:
        num_problems: How many distinct problems.
        seed: Problem seed; use different seeds for training and validation sets.
        operands: Numbers per problem.
        low: Smallest operand.
        high: Largest operand.
    """

    def __init__(self, num_problems: int = 4000, seed: int = 1, operands: int = 3, low: int = 10, high: int = 99):
        if num_problems < 1:
            raise ValueError(f"ChainSource: num_problems must be >= 1, got {num_problems}")
        if operands < 2:
            raise ValueError(f"ChainSource: operands must be >= 2, got {operands}")
        if not 0 <= low <= high:
            raise ValueError(f"ChainSource: need 0 <= low <= high, got low={low}, high={high}")
        self.task = ChainTask(operands, low, high)
        self.num_problems, self.seed = num_problems, seed

    def rows(self) -> list[dict]:
        return [{"prompt": self.task.prompt(p), "answer": self.task.answer(p)}
                for p in self.task.problems(self.num_problems, self.seed)]
