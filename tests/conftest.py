"""Shared fixtures: a tiny embedded addition model built once per test session (real transformers
model, real tokenizer, saved with save_pretrained), and the path of the real GSM8K test split
shipped in tests/data (MIT licence, see tests/data/README.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "tests" / "data" / "gsm8k_test.jsonl"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide addition model with a short warm start (a few seconds to build)."""
    from espo_lightning.tasks.addition import AdditionModelBuilder

    path = tmp_path_factory.mktemp("models") / "addition-tiny"
    AdditionModelBuilder(sft_steps=20, hidden_size=64, num_layers=2)(path)
    return str(path)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> str:
    """The same model at width 128 (heads of 32): the CPU build of vLLM has no attention kernel for
    the 16-wide heads of ``tiny_model_dir``."""
    from espo_lightning.tasks.addition import AdditionModelBuilder

    path = tmp_path_factory.mktemp("vllm-models") / "addition-128"
    AdditionModelBuilder(sft_steps=20, hidden_size=128, num_layers=2)(path)
    return str(path)


@pytest.fixture
def gsm8k_path() -> Path:
    assert GSM8K.exists(), f"the real GSM8K test split ships with the tests: {GSM8K} is missing"
    return GSM8K
