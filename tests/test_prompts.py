"""Prompts as users bring them: TRL's conversational format through the chat template, completions
handed to reward functions in TRL's form (TRL's own reward functions run unchanged), and prompts
longer than ``max_prompt_length`` cut with a count or dropped at load."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from espo_lightning.data.source import PromptSource
from espo_lightning.losses import ESPOLoss
from espo_lightning.training.module import PolicyModule
from espo_lightning.rewards import exact_match
from espo_lightning.rollout.datamodule import RolloutDataModule
from espo_lightning.engines import HFEngine
from espo_lightning.data.prompts import PromptEncoder, completions_for_rewards
from espo_lightning.rollout.rewarding import Rewarder
from espo_lightning.tasks.addition import AdditionSource

# A chat template in the addition vocabulary: a user turn ends with "=", the system text comes first.
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "addition-chat"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return str(folder)


class ConversationalAddition(PromptSource):
    """Addition problems as TRL conversational rows, the gold answer in TRL's ``solution`` column."""

    def __init__(self, n: int = 8):
        self.n = n

    def rows(self):
        return [{"prompt": [{"role": "user", "content": r["prompt"][:-1]}], "solution": r["answer"]}
                for r in AdditionSource(num_problems=self.n, seed=4).rows()]


class _FakeTrainer:
    def __init__(self, module):
        self.lightning_module = module
        self.global_rank, self.world_size, self.current_epoch, self.global_step = 0, 1, 0, 0


def _dm(model_dir, source, **kwargs):
    module = PolicyModule(model_dir, loss=ESPOLoss())
    module.configure_model()
    kwargs.setdefault("reward_funcs", [exact_match])
    dm = RolloutDataModule(train_data=source, engine=HFEngine(), max_new_tokens=3, **kwargs)
    dm.trainer = _FakeTrainer(module)
    return dm


def test_conversational_prompts_go_through_the_chat_template(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    encoder = PromptEncoder(tok, max_prompt_length=64)
    assert encoder.encode([[{"role": "user", "content": "12+34"}]]).ids == [tok.encode("12+34=")]
    # a system message from the config is put first unless the prompt has one
    with_system = PromptEncoder(tok, max_prompt_length=64, system_prompt="1")
    assert with_system.full_ids([{"role": "user", "content": "2+3"}]) == tok.encode("12+3=")
    assert with_system.full_ids([{"role": "system", "content": "9"}, {"role": "user", "content": "2+3"}]) == \
        tok.encode("92+3=")
    # a final assistant message is continued, and its text leads the completion reward functions see
    prompt = [{"role": "user", "content": "12+34"}, {"role": "assistant", "content": "4"}]
    assert encoder.full_ids(prompt) == tok.encode("12+34=4")
    assert completions_for_rewards([prompt, "1+1="], ["6", "2"]) == [[{"role": "assistant", "content": "46"}], "2"]
    plain = PromptEncoder(tok, max_prompt_length=64)
    assert plain.full_ids("12+34=") == tok.encode("12+34=")  # text prompts stay text


def test_conversational_prompts_need_a_chat_template(tiny_model_dir):
    dm = _dm(tiny_model_dir, ConversationalAddition(), prompts_per_rollout=2, num_generations=2)
    with pytest.raises(ValueError, match="conversational prompts: the tokenizer has no chat template"):
        dm.rollout(epoch=0)


def test_reward_functions_receive_conversational_completions(chat_model_dir):
    seen = {}

    def recording(prompts, completions, solution, **kw):
        seen.update(prompts=prompts, completions=completions, solution=solution)
        return [0.0] * len(completions)

    dm = _dm(chat_model_dir, ConversationalAddition(), prompts_per_rollout=2, num_generations=2,
             reward_funcs=[recording])
    dm.rollout(epoch=0)
    assert len(seen["completions"]) == 4
    for completion in seen["completions"]:
        assert isinstance(completion, list) and len(completion) == 1
        assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)
    assert seen["prompts"][0] == seen["prompts"][1] and seen["prompts"][0][0]["role"] == "user"
    assert seen["solution"][0] == seen["solution"][1]


def test_trl_reward_functions_run_unchanged():
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL is not installed (pip install trl)")
    prompts = [[{"role": "user", "content": "What is 40+6?"}]] * 3
    completions = completions_for_rewards(prompts, [r"<think>add</think> The answer is \boxed{46}", r"\boxed{45}",
                                                    "<think>no closing tag"])
    rewarder = Rewarder([trl_rewards.accuracy_reward, trl_rewards.think_format_reward], [1.0, 0.5],
                        trl_rewards.accuracy_reward)
    out = rewarder.score(prompts, completions, {"solution": ["46", "46", "46"]})
    assert out.total == [1.5, 0.0, 0.0] and out.correct == [1.0, 0.0, 0.0]


def test_trl_reward_functions_in_a_rollout(chat_model_dir):
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL is not installed (pip install trl)")
    dm = _dm(chat_model_dir, ConversationalAddition(), prompts_per_rollout=2, num_generations=2,
             reward_funcs=[trl_rewards.accuracy_reward, trl_rewards.think_format_reward])
    batch, stats = dm.rollout(epoch=0)
    # digits without \boxed are no answer for TRL's accuracy_reward, and there is no <think>: all 0
    assert stats.rewards.eq(0).all() and len(batch) == 4
    assert stats.samples[0]["prompt"].startswith("user: ")


def test_overlong_prompts_are_cut_and_counted_once_warned(tiny_model_dir, caplog):
    dm = _dm(tiny_model_dir, AdditionSource(num_problems=20, seed=2), prompts_per_rollout=4, num_generations=2,
             max_prompt_length=5)  # "12+34=" is 6 tokens
    with caplog.at_level(logging.WARNING):
        batch, stats = dm.rollout(epoch=0)
        dm.rollout(epoch=1)
    assert stats.prompt_truncated == 4 and batch.prompt_length == 5
    warnings = [r.message for r in caplog.records if "data.max_prompt_length" in r.message]
    assert len(warnings) == 1 and "4 of 4 prompts" in warnings[0]


def test_filter_overlong_prompts_drops_them_at_load_with_a_count(tiny_model_dir, caplog):
    source = AdditionSource(num_problems=40, seed=2, low=1, high=12)  # "1+2=" (4) up to "12+11=" (6)
    fits = [r for r in source.rows() if len(r["prompt"]) <= 5]
    assert 0 < len(fits) < 40
    dm = _dm(tiny_model_dir, source, prompts_per_rollout=4, num_generations=2, max_prompt_length=5,
             filter_overlong_prompts=True)
    with caplog.at_level(logging.WARNING):
        rows = dm._rows()
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in fits]
    assert any(f"dropped {40 - len(fits)} of 40 prompts" in r.message for r in caplog.records)
    _, stats = dm.rollout(epoch=0)
    assert stats.prompt_truncated == 0


def test_filter_overlong_prompts_that_leaves_nothing_is_an_error(tiny_model_dir):
    dm = _dm(tiny_model_dir, AdditionSource(num_problems=5), prompts_per_rollout=1, num_generations=2,
             max_prompt_length=2, filter_overlong_prompts=True)
    with pytest.raises(ValueError, match="data.train_data: every prompt is longer than data.max_prompt_length=2"):
        dm._rows()


def test_text_prompts_are_encoded_in_one_call_as_one_by_one(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    rows = AdditionSource(num_problems=6, seed=2).rows()
    mixed = [r["prompt"] for r in rows[:3]] + [[{"role": "user", "content": rows[3]["prompt"][:-1]}]] + [rows[4]["prompt"]]
    encoder = PromptEncoder(tok, max_prompt_length=4)
    encoded = encoder.encode(mixed)
    full = [encoder.full_ids(p) for p in mixed]
    assert encoded.ids == [x[-4:] for x in full] and encoded.truncated == [len(x) > 4 for x in full]
    assert encoded.ids[0] == tok.encode(mixed[0], add_special_tokens=True)[-4:]
