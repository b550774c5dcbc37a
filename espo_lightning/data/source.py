"""Where prompts come from. A source yields rows: dicts with a rendered ``prompt`` string plus every
other column of the data (the answer column among them), which reward functions receive as
keyword arguments, the way TRL passes dataset columns to reward functions."""
from __future__ import annotations

from abc import ABC, abstractmethod


class PromptSource(ABC):
    """Base class of prompt sources; pick one in YAML by ``class_path``."""

    @abstractmethod
    def rows(self) -> list[dict]:
        """All rows, each with a ``prompt`` key (str) and the source's other columns."""
