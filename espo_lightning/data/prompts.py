"""Prompts into token ids, and completions into the form reward functions receive.

Text prompts are encoded as they are, or wrapped as one user message when ``use_chat_template`` is
set; conversational prompts (TRL's list of ``{role, content}`` messages) always go through the chat
template, and a final assistant message is continued rather than closed (TRL's bootstrap). Reward
functions get text completions for text prompts and ``[{"role": "assistant", "content": ...}]`` for
conversational ones, as TRL's ``GRPOTrainer`` passes them.

A prompt longer than ``max_prompt_length`` tokens keeps its last tokens (the question and the
generation prompt sit at the end) and is counted; ``filter_overlong_prompts`` drops such rows when
the data loads instead."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from espo_lightning.data.messages import is_conversational
from espo_lightning.errors import ConfigError


@dataclass
class EncodedPrompts:
    ids: list[list[int]]  # at most max_prompt_length tokens each
    truncated: list[bool]  # True where the prompt lost its first tokens


class PromptEncoder:
    """Encodes prompts with one tokenizer and the DataModule's prompt settings."""

    def __init__(self, tokenizer, max_prompt_length: int, use_chat_template: bool = False,
                 system_prompt: str | None = None):
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.use_chat_template, self.system_prompt = use_chat_template, system_prompt

    def templated(self, prompt: Any) -> bool:
        """Whether ``prompt`` goes through the chat template (else it is encoded as text)."""
        return self.use_chat_template or is_conversational(prompt)

    def full_ids(self, prompt: Any) -> list[int]:
        """The prompt's token ids before any cut."""
        tok = self.tokenizer
        if not self.templated(prompt):
            return list(tok.encode(str(prompt), add_special_tokens=True))
        if not getattr(tok, "chat_template", None):
            what = "data.use_chat_template" if not is_conversational(prompt) else "conversational prompts"
            raise ConfigError(f"{what}: the tokenizer has no chat template; give text prompts"
                              + (" or set it to false" if not is_conversational(prompt) else ""))
        messages = list(prompt) if is_conversational(prompt) else [{"role": "user", "content": str(prompt)}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        bootstrap = messages[-1]["role"] == "assistant"
        ids = tok.apply_chat_template(messages, add_generation_prompt=not bootstrap, continue_final_message=bootstrap,
                                      tokenize=True, return_dict=False)
        return list(ids)

    def encode(self, prompts: list) -> EncodedPrompts:
        full: list = [None] * len(prompts)
        plain = [i for i, p in enumerate(prompts) if not self.templated(p)]
        if plain:  # one call into the tokenizer for all text prompts (per prompt: ~70 us each on a CPU)
            ids = self.tokenizer([str(prompts[i]) for i in plain], add_special_tokens=True)["input_ids"]
            for i, row in zip(plain, ids):
                full[i] = list(row)
        full = [x if x is not None else self.full_ids(p) for x, p in zip(full, prompts)]
        return EncodedPrompts(ids=[x[-self.max_prompt_length:] for x in full],
                              truncated=[len(x) > self.max_prompt_length for x in full])

    def fits(self, prompt: Any) -> bool:
        return len(self.full_ids(prompt)) <= self.max_prompt_length


def drop_overlong(rows: list[dict], encoder: PromptEncoder, key: str) -> list[dict]:
    """The rows whose prompt fits ``max_prompt_length`` (``filter_overlong_prompts``); none fitting
    is an error naming the config key of the source."""
    kept = [r for r in rows if encoder.fits(r["prompt"])]
    if not kept:
        raise ConfigError(f"{key}: every prompt is longer than data.max_prompt_length={encoder.max_prompt_length} "
                          "tokens; raise it or set data.filter_overlong_prompts: false to cut prompts")
    return kept


def completions_for_rewards(prompts: list, texts: list[str]) -> list:
    """Each completion as reward functions receive it: text, or one assistant message (holding the
    continued assistant text first, where the prompt ended with one) for conversational prompts."""
    out = []
    for prompt, text in zip(prompts, texts):
        if is_conversational(prompt):
            bootstrap = prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""
            out.append([{"role": "assistant", "content": bootstrap + text}])
        else:
            out.append(text)
    return out
