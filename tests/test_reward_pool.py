"""Reward functions in worker processes (``data.reward_workers``): the same rewards as in the
trainer's process, a hard per-completion time limit that scores None and is counted, and errors
that name the function and the completion. Real spawned processes, real SIGKILLs."""
from __future__ import annotations

import os
import time

import pytest

from espo_lightning.errors import ConfigError, RewardError
from espo_lightning.rewards import exact_match, math_accuracy
from espo_lightning.rollout.rewarding import Rewarder
import reward_toys as toys

pytestmark = pytest.mark.slow  # spawned worker processes, real timeouts and SIGKILLs

PROMPTS = ["q0", "q1", "q2", "q3"]


def test_workers_give_the_rewards_of_the_main_process():
    completions = [r"\boxed{4}", "the answer is 5", "", r"\boxed{x}"]
    columns = {"answer": ["4", "5", "6", "7"]}
    inline = Rewarder([math_accuracy, toys.length_reward], [1.0, 0.5], math_accuracy).score(PROMPTS, completions, columns)
    pooled = Rewarder([math_accuracy, toys.length_reward], [1.0, 0.5], math_accuracy, workers=2)
    try:
        out = pooled.score(PROMPTS, completions, columns)
    finally:
        pooled.close()
    assert out.total == inline.total and out.correct == inline.correct == [1.0, 1.0, 0.0, 0.0]
    assert out.timed_out == [False] * 4


def test_a_stalled_completion_scores_none_for_that_function_only_and_is_counted():
    rewarder = Rewarder([toys.slow_on_stall, toys.length_reward], [1.0, 1.0], toys.slow_on_stall, workers=2,
                        timeout_s=3.0)
    try:
        t0 = time.monotonic()
        out = rewarder.score(PROMPTS, ["ab", "stall", "abc", "a"], {})
        elapsed = time.monotonic() - t0
        # the stalled pair is None, its length reward stands: 0 + len("stall")
        assert out.total == [3.0, 5.0, 4.0, 2.0] and out.timed_out == [False, True, False, False]
        assert out.correct == [1.0, 0.0, 1.0, 1.0]
        assert elapsed < 120, elapsed  # bounded by the limit, not by the 600 s sleep
        # the killed worker was replaced: the pool keeps working
        again = rewarder.score(PROMPTS[:2], ["x", "yy"], {})
        assert again.total == [2.0, 3.0] and not any(again.timed_out)
    finally:
        rewarder.close()


def test_a_function_that_raises_in_a_worker_is_named_with_the_completion():
    rewarder = Rewarder([toys.raises_on_bad], [1.0], toys.raises_on_bad, workers=1)
    try:
        with pytest.raises(RewardError, match=r"function reward_toys\.raises_on_bad raised on completion 2 "
                                              r"\(KeyError: 'no gold answer'\)"):
            rewarder.score(PROMPTS, ["a", "b", "bad", "c"], {})
    finally:
        rewarder.close()


def test_a_worker_that_dies_is_reported_with_the_function_and_completion():
    rewarder = Rewarder([toys.dies_on_crash], [1.0], toys.dies_on_crash, workers=1)
    try:
        with pytest.raises(RewardError, match=r"dies_on_crash killed its worker process on completion 1 "
                                              r"\(exit code 3\)"):
            rewarder.score(PROMPTS, ["a", "crash", "b", "c"], {})
    finally:
        rewarder.close()


def test_non_numbers_from_a_worker_are_refused_like_in_process():
    rewarder = Rewarder([toys.returns_text], [1.0], toys.returns_text, workers=1)
    try:
        with pytest.raises(RewardError, match=r"returns_text returned 'yes' \(str\) for completion 0"):
            rewarder.score(PROMPTS, ["a", "b", "c", "d"], {})
    finally:
        rewarder.close()


def test_functions_that_cannot_reach_a_worker_are_refused_by_name():
    def local(prompts, completions, **kw):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"local cannot be sent to a reward worker process.*reward_workers: 0"):
        Rewarder([local], [1.0], local, workers=1).score(PROMPTS, ["a"] * 4, {})


def test_rewards_run_in_the_workers_and_they_exit_on_close():
    rewarder = Rewarder([toys.pid_reward], [1.0], toys.pid_reward, workers=2)
    out = rewarder.score(PROMPTS * 8, ["x"] * 32, {})
    pool = rewarder._pool
    processes = [w.process for w in pool._pool]
    assert {int(v) for v in out.total} <= {p.pid for p in processes} and os.getpid() not in out.total
    rewarder.close()
    assert all(not p.is_alive() for p in processes)


def test_timeout_needs_workers():
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.tasks.addition import AdditionSource

    with pytest.raises(ConfigError, match="data.reward_timeout_s needs data.reward_workers >= 1"):
        RolloutDataModule(train_data=AdditionSource(), reward_funcs=[exact_match], reward_timeout_s=5.0)


def test_a_rollout_counts_timeouts_for_the_logs(tiny_model_dir):
    """A DataModule with reward workers: the group whose verifier hangs scores None (advantage 0),
    is counted in the rollout stats, and RolloutMonitor logs the fraction as reward/timeout_frac."""
    from callbacks.rollout import RolloutMonitor
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.engines import HFEngine
    from espo_lightning.tasks.addition import AdditionSource

    module = PolicyModule(tiny_model_dir, loss=ESPOLoss())
    module.configure_model()
    source = AdditionSource(num_problems=30, seed=3)
    probe = RolloutDataModule(train_data=source, reward_funcs=[exact_match], prompts_per_rollout=4)
    probe.trainer = type("T", (), {"global_rank": 0, "world_size": 1})()
    hanging = probe._rollout_rows(0)[1]["prompt"]
    dm = RolloutDataModule(train_data=source, reward_funcs=[toys.StallOnPrompt(hanging)], engine=HFEngine(),
                           prompts_per_rollout=4, num_generations=2, max_new_tokens=3, reward_workers=2,
                           reward_timeout_s=2.0)
    dm.trainer = type("T", (), {"lightning_module": module, "global_rank": 0, "world_size": 1, "current_epoch": 0,
                                "global_step": 0})()
    try:
        batch, stats = dm.rollout(epoch=0)
    finally:
        dm.teardown("fit")
    assert stats.reward_timeouts == 2 and stats.rewards[2:4].isnan().all() and stats.rewards.isnan().sum() == 2
    # the hanging group (rows 2, 3) has advantage 0; the other groups' rewards (lengths) still give
    # advantages, so a timeout that silenced the whole rollout would show
    assert batch.advantages[2:4].eq(0).all() and not stats.rewards[[0, 1, 4, 5, 6, 7]].isnan().any()
    varied = [g for g in (0, 2, 3) if stats.rewards[2 * g] != stats.rewards[2 * g + 1]]
    assert varied, f"no scored group with reward variance: the check below would be vacuous ({stats.rewards})"
    for g in varied:
        assert batch.advantages[2 * g: 2 * g + 2].ne(0).all(), g
    sums, maxes = RolloutMonitor().rank_totals(stats)
    assert RolloutMonitor.summarize(sums, maxes)["reward/timeout_frac"] == 2 / 8
