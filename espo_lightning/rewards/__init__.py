"""Reward functions, TRL convention: ``f(prompts=..., completions=..., **columns) -> list[float | None]``
with dataset columns passed as lists by name; None means the verifier could not score a completion."""
from espo_lightning.rewards.exact import exact_match, last_number_match
from espo_lightning.rewards.format import RegexFormatReward, format_reward
from espo_lightning.rewards.math import extract_answer, gold_answer, math_accuracy
from espo_lightning.rewards.overlong import OverlongPenalty

__all__ = ["math_accuracy", "format_reward", "RegexFormatReward", "exact_match", "last_number_match", "OverlongPenalty", "extract_answer",
           "gold_answer"]
