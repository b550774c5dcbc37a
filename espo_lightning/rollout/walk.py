"""The data walk: which prompts each rollout (and each sampling round) draws.

Walk position k is prompt ``order[pass][offset]`` with ``pass, offset = divmod(k, len(rows))``, a
seeded shuffle per pass over the data, so within a pass no prompt repeats. Each rollout takes the P
positions after the previous one's, P per sampling round; the positions are split over ranks by
``rank::world``. The position is saved in checkpoints (the DataModule's ``state_dict``), so a resumed
run draws what the interrupted one would have; a reloaded epoch starts where it started before."""
from __future__ import annotations

import random

from espo_lightning.errors import ConfigError


class DataWalk:
    def __init__(self, prompts_per_rollout: int, seed: int):
        self.prompts_per_rollout, self.seed = prompts_per_rollout, seed
        self.next_start: int | None = None  # first position of the next epoch's rollout
        self.last: tuple[int, int] | None = None  # (epoch, first position) of the latest rollout
        self._orders: dict[tuple[int, int], list[int]] = {}  # (pass, rows) -> that pass's shuffle

    def epoch_start(self, epoch: int) -> int:
        """Position of ``epoch``'s first prompt. Without saved state (a fresh run, or a checkpoint
        from before the walk was saved), epoch e starts at e * P: one round per rollout."""
        if self.last is not None and self.last[0] == epoch:
            return self.last[1]
        return epoch * self.prompts_per_rollout if self.next_start is None else self.next_start

    def finished(self, epoch: int, start: int, rounds: int) -> None:
        """Record that ``epoch``'s rollout started at ``start`` and drew ``rounds`` rounds of P prompts."""
        self.last, self.next_start = (epoch, start), start + rounds * self.prompts_per_rollout

    def rows_at(self, rows: list[dict], start: int, rank: int, world: int) -> list[dict]:
        """This rank's share of the P prompts at positions ``start .. start + P``."""
        if self.prompts_per_rollout % world:
            raise ConfigError(f"data.prompts_per_rollout ({self.prompts_per_rollout}) must be divisible by the "
                              f"number of ranks ({world})")
        chosen = []
        for k in range(start, start + self.prompts_per_rollout):
            data_pass, offset = divmod(k, len(rows))
            chosen.append(rows[self._order(data_pass, len(rows))[offset]])
        return chosen[rank::world]

    def _order(self, data_pass: int, n: int) -> list[int]:
        """The seeded shuffle of pass ``data_pass`` over ``n`` rows, kept while the walk is in that
        pass (reshuffling a large prompt set for every rollout costs milliseconds each time)."""
        key = (data_pass, n)
        if key not in self._orders:
            if len(self._orders) >= 2:  # a rollout spans at most the current pass and the next one
                self._orders.pop(next(iter(self._orders)))
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + data_pass).shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def state_dict(self) -> dict:
        return {"next_start": self.next_start, "last": list(self.last) if self.last is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.next_start = state.get("next_start")
        last = state.get("last")
        self.last = (int(last[0]), int(last[1])) if last is not None else None
