"""TRL's conversational prompt format: a prompt given as a list of chat messages,
``[{"role": "system", "content": ...}, {"role": "user", "content": ...}]``, instead of a string.

Such prompts always go through the tokenizer's chat template, and the reward functions then receive
each completion the way TRL's ``GRPOTrainer`` passes it: a list holding one assistant message."""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


def is_conversational(prompt: Any) -> bool:
    """True for a list of messages (dicts with a ``role``), TRL's test for conversational data."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def check_messages(prompt: Any) -> str | None:
    """What is wrong with a conversational prompt (None when nothing is)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return "a conversational prompt must be a non-empty list of {role, content} messages"
    for k, message in enumerate(prompt, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {k} of the prompt is not a {{role, content}} dict: {message!r:.120}"
        if message["role"] not in ROLES:
            return f"message {k} has role {message['role']!r}; roles are {list(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {k} ({message['role']}) has no text 'content'"
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        return "the prompt has no user message with text"
    return None


def last_user_message(prompt: list[dict]) -> int:
    """Index of the last user message (the one a prompt template rewrites)."""
    return max(i for i, m in enumerate(prompt) if m["role"] == "user")


def as_text(prompt: Any) -> str:
    """A prompt for logs and sample tables: a string as it is, messages as ``role: content`` lines."""
    if is_conversational(prompt):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return str(prompt)
