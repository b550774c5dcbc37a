"""Turning jsonargparse's nested, multi-line validation errors into one line that names the key,
the specific problem, and what is allowed."""
from __future__ import annotations

import re

# What a class_path may name, per config key, for the "allowed" part of the message.
ALLOWED = {
    "model.loss": "espo_lightning.losses.{ESPOLoss, GSPOLoss, GRPOLoss, CISPOLoss, GMPOLoss} or a PolicyLoss subclass",
    "data.engine": "espo_lightning.engines.{HFEngine, VLLMEngine, VLLMServerEngine} or a RolloutEngine subclass",
    "data.train_data": "espo_lightning.data.sources.FilePromptSource, espo_lightning.tasks.addition.AdditionSource, espo_lightning.tasks.chain.ChainSource or a PromptSource subclass",
    "data.val_data": "espo_lightning.data.sources.FilePromptSource, espo_lightning.tasks.addition.AdditionSource, espo_lightning.tasks.chain.ChainSource or a PromptSource subclass",
    "data.reward_funcs": "import paths of reward functions, e.g. espo_lightning.rewards.math_accuracy",
}


def one_line(message: str) -> str:
    lines = [ln.rstrip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "invalid configuration"
    key_match = re.search(r'Parser key "([^"]+)"', message)
    key = key_match.group(1) if key_match else None
    details = []
    for i, ln in enumerate(lines):
        text = ln.strip()
        if not text.startswith("- ") or "NoneType" in text:
            continue
        text = text[2:].strip()
        j = i + 1  # "Problem with given class_path 'x':" + its reason, through nested 'Parser key "k":' lines
        while text.endswith(":") and j < len(lines) and not lines[j].strip().startswith("- "):
            text = f"{text} {lines[j].strip()}"
            j += 1
        details.append(text)
    head = "; ".join(details) if details else lines[0].strip()
    if key and not head.startswith(key):
        head = f"{key}: {head}"
    if key in ALLOWED and "class_path" in message:
        head += f" (allowed: {ALLOWED[key]})"
    return re.sub(r"\s+", " ", head)
