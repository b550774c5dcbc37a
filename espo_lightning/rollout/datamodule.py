"""The rollout DataModule: every epoch it samples G completions for P prompts with the rollout
engine, scores them with the reward functions, computes advantages, lets the policy score old
log-probs and entropies, and serves the result as minibatches for ``ppo_epochs`` passes.

It is plumbing; the parts live beside it: ``prompts`` (encoding, chat template, what reward
functions receive), ``sampling`` (rounds of dynamic sampling), ``rewarding`` (reward functions,
worker pool), ``walk`` (which prompts), ``minibatching``, ``loaders``, ``resume`` (a rollout
in a checkpoint), ``tensors`` (packing), ``behaviour`` (engine / off-policy correction: TIS, MIS,
IcePop). Validation lives in ``espo_lightning.evaluation`` (its sets, metrics and files); the
DataModule only hands Lightning its steps.

Under several ranks each rank owns whole prompt groups (P / world_size prompts), so advantages need
no communication; every rank serves the same number of minibatches so collectives stay in step."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from espo_lightning.rollout.advantages import group_advantages, rewards_to_tensor
from espo_lightning.data.source import PromptSource
from espo_lightning.errors import ConfigError
from espo_lightning.evaluation import EvalSet, Evaluator, resolve_sets
from espo_lightning.rollout import minibatching, resume
from espo_lightning.rollout.batch import RolloutBatch, ServedBatch
from espo_lightning.engines.base import RolloutEngine, Sampling
from espo_lightning.engines.hf import HFEngine
from espo_lightning.rollout.loaders import Items, RolloutLoader
from espo_lightning.rollout.behaviour import BehaviourCorrection, apply_behaviour_correction
from espo_lightning.data.prompts import PromptEncoder, completions_for_rewards, drop_overlong
from espo_lightning.rollout.rewarding import Rewarder
from espo_lightning.rollout.sampling import Groups, SampledRollout, sample_rounds
from espo_lightning.rollout.stats import RolloutStats, rollout_stats
from espo_lightning.rollout.tensors import build_rollout_batch
from espo_lightning.rollout.walk import DataWalk

log = logging.getLogger(__name__)

class RolloutDataModule(L.LightningDataModule):
    """Generates, scores and serves one rollout per epoch.

    Args:
        train_data: Prompt source for rollouts (``FilePromptSource``, ``AdditionSource``, ...).
        reward_funcs: Reward functions ``f(prompts, completions, **columns) -> list[float | None]``,
            given as import paths (``espo_lightning.rewards.math_accuracy``) or ``class_path`` objects.
        val_data: Held-out prompts: one source (greedy ``val/accuracy``, as the set ``val``), or
            evaluation sets by name, each a source (greedy) or an ``EvalSet`` with its own ``k``,
            ``greedy``, ``temperature``, ``top_p``, ``max_new_tokens`` and ``pass_at_k``, logged
            as ``val/<name>/accuracy``, ``avg@k``, ``pass@k``, ``response_len_mean``,
            ``truncated_frac`` (docs/evaluation.md). None disables validation.
        reward_weights: One weight per reward function (default 1.0 each).
        accuracy_reward: Function whose reward 1.0 means "correct" for ``reward/accuracy`` and
            validation's correctness; defaults to the first reward function.
        engine: Rollout engine (``HFEngine`` or ``VLLMEngine``).
        prompts_per_rollout: P, prompts per epoch over all ranks (divisible by the world size).
        num_generations: G, completions per prompt (>= 2: advantages compare within a group).
        minibatch_size: Responses per optimizer step on each rank; default: the whole rollout.
        ppo_epochs: Passes over each rollout (>1 moves the policy off the sampling policy).
        temperature: Sampling temperature; log-probs and entropies use the same temperature.
        top_p: Nucleus sampling.
        max_new_tokens: Completion budget; completions that hit it without EOS are "truncated".
        max_prompt_length: Longer prompts keep their last tokens; how many did is logged as
            ``rollout/prompt_truncated_frac`` (with a warning the first time).
        filter_overlong_prompts: Drop prompts longer than ``max_prompt_length`` when the data loads
            (train and validation; the count is logged) instead of cutting them.
        use_chat_template: Wrap text prompts with the tokenizer's chat template (instruct models);
            conversational prompts (lists of messages) always use it.
        system_prompt: System message used with the chat template (unless the prompt has one).
        drop_zero_std_groups: Dynamic sampling (DAPO): groups whose rewards do not vary are dropped
            and fresh prompt groups generated until the rollout holds ``prompts_per_rollout`` groups
            with variance (see ``rollout.sampling``).
        max_sampling_rounds: Bound on the generation rounds of one rollout under dynamic sampling.
        mask_truncated: Exclude truncated completions from the loss.
        tis_cap: Truncated importance sampling for the engine/trainer mismatch (off when null): each
            token's loss term is weighted by ``min(pi_old / pi_engine, tis_cap)`` (folded into
            per-token advantages). Needs an engine that returns log-probs. The same as
            ``behaviour_correction: {mode: truncate, level: token, high: <tis_cap>}``.
        behaviour_correction: Off-policy correction by the behaviour (engine) policy (off when
            null; docs/engines.md): ``mode`` truncate (TIS), mask (MIS) or icepop, ``level`` token,
            sequence or geometric, bounds ``low`` / ``high``. The old log-probs are still the
            trainer's (the PPO ratio and ESPO's groups use them); the weights ``pi_old / pi_engine``
            fold into per-token advantages. Needs an engine that returns log-probs; not with ``tis_cap``.
        reward_workers: Processes that run the reward functions (0: in the trainer's process). Each
            (function, completion) pair is one task; functions must be importable.
        reward_timeout_s: Wall-clock limit of one reward-function call on one completion in a
            worker (needs ``reward_workers`` >= 1); past it the completion scores None for that
            function, counted as ``reward/timeout_frac``.
        max_staleness: 0 (default): every rollout is sampled from the current weights, then trained
            on. 1: one-step-off-policy: rollout k + 1's first sampling round is generated (in the
            engine's own process, ``VLLMServerEngine``) while the trainer trains on rollout k, from
            the weights of before that training; ``rollout/staleness`` logs how many rollouts old the
            weights were. Evaluation always syncs the current weights first. A resumed run
            regenerates what was in flight (docs/engines.md).
        val_max_new_tokens: Completion budget of validation sets that set none (default:
            ``max_new_tokens``).
        val_batch_size: Problems per validation step on each rank (one ``generate`` call: with k
            samples, k completions per problem).
        val_samples_per_set: Completions written per set and evaluation to
            ``<log_dir>/eval_samples/<set>_step<step>.jsonl`` (all samples of the first problems);
            0 writes none, -1 all (at the paper's setting that can be a gigabyte of text).
        num_samples_logged: Sample completions kept per rollout for the logs, and written per
            validation set as TensorBoard text.
        seed: Seed of prompt order and sampling (validation samples too: each problem's k samples
            come from a seed of (seed, set name, problem index), the same at every evaluation).
    """

    def __init__(
        self,
        train_data: PromptSource,
        reward_funcs: list[Callable],
        val_data: PromptSource | dict[str, EvalSet | PromptSource] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_reward: Callable | None = None,
        engine: RolloutEngine | None = None,
        prompts_per_rollout: int = 32,
        num_generations: int = 8,
        minibatch_size: int | None = None,
        ppo_epochs: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        max_prompt_length: int = 1024,
        filter_overlong_prompts: bool = False,
        use_chat_template: bool = False,
        system_prompt: str | None = None,
        drop_zero_std_groups: bool = False,
        max_sampling_rounds: int = 10,
        mask_truncated: bool = False,
        tis_cap: float | None = None,
        behaviour_correction: BehaviourCorrection | None = None,
        reward_workers: int = 0,
        reward_timeout_s: float | None = None,
        max_staleness: int = 0,
        val_max_new_tokens: int | None = None,
        val_batch_size: int = 64,
        val_samples_per_set: int = 64,
        num_samples_logged: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        _check(num_generations >= 2, "data.num_generations", "must be >= 2 (advantages compare responses within a group)", num_generations)
        _check(prompts_per_rollout >= 1, "data.prompts_per_rollout", "must be >= 1", prompts_per_rollout)
        _check(minibatch_size is None or minibatch_size >= 1, "data.minibatch_size", "must be >= 1", minibatch_size)
        _check(ppo_epochs >= 1, "data.ppo_epochs", "must be >= 1", ppo_epochs)
        _check(temperature > 0, "data.temperature", "must be > 0", temperature)
        _check(0 < top_p <= 1, "data.top_p", "must be in (0, 1]", top_p)
        _check(max_new_tokens >= 1, "data.max_new_tokens", "must be >= 1", max_new_tokens)
        _check(max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1", max_prompt_length)
        _check(tis_cap is None or tis_cap > 0, "data.tis_cap", "must be > 0 (or null to disable)", tis_cap)
        if tis_cap is not None and behaviour_correction is not None:
            raise ConfigError("data.tis_cap and data.behaviour_correction are both set: set one (tis_cap: C is "
                              "behaviour_correction: {mode: truncate, level: token, high: C})")
        if behaviour_correction is not None:
            behaviour_correction.validate("data.behaviour_correction")
        _check(val_batch_size >= 1, "data.val_batch_size", "must be >= 1", val_batch_size)
        _check(val_samples_per_set >= -1, "data.val_samples_per_set", "must be >= 0 (or -1: all)", val_samples_per_set)
        _check(max_sampling_rounds >= 1, "data.max_sampling_rounds", "must be >= 1", max_sampling_rounds)
        _check(max_staleness in (0, 1), "data.max_staleness", "must be 0 (synchronous) or 1 (one-step-off-policy)",
               max_staleness)
        self.rewarder = Rewarder(reward_funcs, reward_weights, accuracy_reward, reward_workers, reward_timeout_s)
        self.train_data, self.val_data = train_data, val_data
        self.reward_funcs, self.reward_weights = self.rewarder.funcs, self.rewarder.weights
        self.accuracy_reward = self.rewarder.accuracy
        self.engine = engine if engine is not None else HFEngine()
        self.prompts_per_rollout, self.num_generations = prompts_per_rollout, num_generations
        self.minibatch_size, self.ppo_epochs = minibatch_size, ppo_epochs
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.max_prompt_length, self.filter_overlong_prompts = max_prompt_length, filter_overlong_prompts
        self.use_chat_template, self.system_prompt = use_chat_template, system_prompt
        self.drop_zero_std_groups, self.max_sampling_rounds = drop_zero_std_groups, max_sampling_rounds
        self.mask_truncated, self.tis_cap = mask_truncated, tis_cap
        self.behaviour_correction = behaviour_correction
        self._correction = (BehaviourCorrection("truncate", "token", high=tis_cap) if tis_cap is not None
                            else behaviour_correction)
        self.reward_workers, self.reward_timeout_s = reward_workers, reward_timeout_s
        self.val_max_new_tokens = val_max_new_tokens or max_new_tokens
        self.val_batch_size, self.num_samples_logged, self.seed = val_batch_size, num_samples_logged, seed
        self.evaluator = Evaluator(resolve_sets(val_data, temperature=temperature, top_p=top_p,
                                                max_new_tokens=self.val_max_new_tokens),
                                   val_batch_size, seed, val_samples_per_set, num_samples_logged)
        self.checkpoint_step: int | None = None  # the global step of a loaded checkpoint (for validate)
        self.last_rollout: RolloutStats | None = None
        self._train_rows: list[dict] | None = None
        self._engine_ready = False
        self._synced_step: int | None = None
        self._sync_s = 0.0  # time in engine.sync_weights not yet counted in a rollout's stats
        self._warned_truncation = self._warned_filler = False
        self._current: tuple | None = None  # (epoch, batch, stats, minibatches) being trained on
        self._restored: dict | None = None  # state from a checkpoint, used by the next train_dataloader
        self.walk = DataWalk(prompts_per_rollout, seed)
        self.max_staleness = max_staleness
        if max_staleness and not self.engine.supports_submit:
            raise ConfigError(f"data.max_staleness: {max_staleness} needs an engine that generates in its own process "
                              f"while the trainer trains (espo_lightning.engines.VLLMServerEngine); "
                              f"{type(self.engine).__name__} cannot")
        self._inflight: dict[int, tuple] = {}  # epoch -> (rows, encoded prompts, Pending) of its first round
        self._round_versions: list[int | None] = []  # the weights each round of the current rollout sampled from
        self._round_times: list[tuple[float, float]] = []  # per round: (trainer's wait, engine's seconds)

    # ----- plumbing ---------------------------------------------------------------------------
    @property
    def module(self):
        return self.trainer.lightning_module

    @property
    def tokenizer(self):
        return self.module.tokenizer

    @property
    def encoder(self) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, self.max_prompt_length, self.use_chat_template, self.system_prompt)

    def _world(self) -> tuple[int, int]:
        return self.trainer.global_rank, self.trainer.world_size

    def _ensure_engine(self) -> None:
        if not self._engine_ready:
            self.engine.setup(self.module.policy, self.tokenizer)
            self._engine_ready = True

    def _sync_engine(self) -> None:
        """Push the policy's weights into the engine when they changed since the last push (after a
        generation in flight finished: it samples from the weights it was submitted with)."""
        self._ensure_engine()
        if self._synced_step != self.trainer.global_step:
            for _, _, pending in self._inflight.values():
                pending.result()  # raises what ended it, naming the rollout it generated
            start = time.perf_counter()
            self.engine.sync_weights(self.module.policy, version=self.trainer.global_step)
            self._sync_s += time.perf_counter() - start  # perf/weight_sync_s of the next rollout's stats
            self._synced_step = self.trainer.global_step

    def _take_sync_s(self) -> float:
        """The push time since the last rollout's stats took it (pushes before evaluations included)."""
        taken, self._sync_s = self._sync_s, 0.0
        return taken

    def check_data(self) -> None:
        """Load the prompt sources now, so a bad path or row fails before any model is loaded."""
        self.rewarder.check_source("data.train_data", self.train_data)
        for spec in self.evaluator.specs.values():
            self.rewarder.check_source(spec.key, spec.source)

    def teardown(self, stage: str) -> None:
        self._inflight.clear()  # a resumed run regenerates what was in flight
        if self._engine_ready:
            self.engine.teardown()
            self._engine_ready = False
            self._synced_step = None
        self.rewarder.close()

    def state_dict(self) -> dict:
        """The data walk's position, so a resumed run draws the prompts the interrupted one would
        have, and where training is in the current rollout (``resume.checkpoint_state``)."""
        trainer = self.trainer if getattr(self.trainer, "training", False) else None
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else None
        return {"walk": self.walk.state_dict(), "global_step": self.trainer.global_step,
                **resume.checkpoint_state(self._current, consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.walk.load_state_dict(state.get("walk", {}))
        self.checkpoint_step = state.get("global_step")
        self._restored = state

    def encode_prompts(self, prompts: list) -> list[list[int]]:
        """Token ids of ``prompts`` (text or messages), cut to ``max_prompt_length``."""
        return self.encoder.encode(prompts).ids

    def _loaded(self, key: str, source: PromptSource) -> list[dict]:
        rows = source.rows()
        if not rows:
            raise ConfigError(f"{key}: the prompt source returned no rows")
        if not self.filter_overlong_prompts:
            return rows
        kept = drop_overlong(rows, self.encoder, key)
        if len(kept) < len(rows):
            self._say(f"{key}: data.filter_overlong_prompts dropped {len(rows) - len(kept)} of {len(rows)} prompts "
                      f"longer than data.max_prompt_length={self.max_prompt_length} tokens")
        return kept

    def _rows(self) -> list[dict]:
        if self._train_rows is None:
            self._train_rows = self._loaded("data.train_data", self.train_data)
        return self._train_rows

    def _say(self, message: str) -> None:
        if self._world()[0] == 0:
            log.warning(message)

    def _rows_at(self, start: int) -> list[dict]:
        rank, world = self._world()
        return self.walk.rows_at(self._rows(), start, rank, world)

    def _rollout_rows(self, epoch: int) -> list[dict]:
        """This rank's prompts of ``epoch``'s first sampling round."""
        return self._rows_at(self.walk.epoch_start(epoch))

    # ----- the rollout ------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        restored, self._restored = self._restored, None
        served = self.num_minibatches() * self.ppo_epochs
        if restored and restored.get("finished_epoch") == epoch:
            # Lightning rebuilds the finished epoch's loader on an epoch-boundary resume and moves on
            # without iterating it: hand it placeholders instead of generating a rollout to discard.
            return RolloutLoader([None] * served, start=served)
        saved = resume.restore(restored, epoch, *self._world(), self.module.device) if restored else None
        batch, stats, start = saved if saved is not None else (*self.rollout(epoch), 0)
        if saved is None:
            self._record_staleness(stats, served)
        if self.max_staleness and epoch + 1 < (self.trainer.max_epochs or 0):
            self._submit_first_round(epoch + 1)  # generated while this rollout is trained on
            if saved is None and stats is not None:
                stats.weight_sync_s += self._take_sync_s()  # the push before its submission
        self.last_rollout = stats
        self._current = (epoch, batch, stats, served)
        return RolloutLoader([ServedBatch(b) for b in self.minibatches(batch, epoch)], start=start)

    def _sampling(self, epoch: int, round_: int) -> Sampling:
        return Sampling(n=self.num_generations, temperature=self.temperature, top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens,
                        seed=self.seed * 7919 + epoch * 104_729 + round_ * 1_000_003 + self._world()[0])

    def _submit_first_round(self, epoch: int) -> None:
        """Start ``epoch``'s first sampling round in the engine's process with the current weights
        (``data.max_staleness``); its ``_generate_round`` collects it."""
        self._sync_engine()
        rows = self._rows_at(self.walk.epoch_start(epoch))
        encoded = self.encoder.encode([r["prompt"] for r in rows])
        self.engine.activity = f"generating rollout {epoch} (in the background)"
        self._inflight[epoch] = (rows, encoded, self.engine.submit(encoded.ids, self._sampling(epoch, 0)))

    def _record_staleness(self, stats, steps_per_rollout: int) -> None:
        """The oldest weights the rollout's rounds sampled from, and how many rollouts old they are."""
        versions = [v for v in self._round_versions if v is not None]
        if stats is None or not versions:
            return
        stats.policy_version = min(versions)
        behind = self.trainer.global_step - stats.policy_version
        stats.staleness = -(-behind // max(1, steps_per_rollout))  # ceil: a partial rollout counts

    def _generate_round(self, rows: list[dict], epoch: int, round_: int) -> Groups:
        """G completions for each of ``rows``, with rewards and group advantages."""
        G = self.num_generations
        if round_ == 0:
            self._round_versions, self._round_times = [], []
        inflight = self._inflight.pop(epoch, None) if round_ == 0 else None
        if inflight is not None and [r["prompt"] for r in inflight[0]] == [r["prompt"] for r in rows]:
            _, encoded, pending = inflight
            start = time.perf_counter()
            gen = pending.result()
        else:
            self._sync_engine()  # no-op unless a round in flight held the push back
            encoded = self.encoder.encode([r["prompt"] for r in rows])
            self.engine.activity = f"generating rollout {epoch}" + (f" (round {round_ + 1})" if round_ else "")
            start = time.perf_counter()
            with self._generation_context():
                gen = self.engine.generate(encoded.ids, self._sampling(epoch, round_), self.module.policy)
        waited = time.perf_counter() - start
        self._round_times.append((waited, waited if gen.seconds is None else gen.seconds))
        # Engines that track no version sample from the weights of now (the sync just ran).
        self._round_versions.append(self.trainer.global_step if gen.policy_version is None else gen.policy_version)
        texts = self.tokenizer.batch_decode(gen.token_ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        completions = completions_for_rewards(prompts, texts)
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = gen.token_ids  # as TRL passes them (length-based rewards read them)
        scored = self.rewarder.score(prompts, completions, columns)
        rewards = rewards_to_tensor(scored.total)
        return Groups(G=G, rows=rows, prompt_ids=encoded.ids, prompt_truncated=encoded.truncated,
                      completion_ids=gen.token_ids, completions=completions, truncated=list(gen.truncated),
                      engine_logprobs=gen.logprobs, rewards=rewards, correct=torch.tensor(scored.correct),
                      timed_out=torch.tensor(scored.timed_out, dtype=torch.bool),
                      advantages=group_advantages(rewards, G))

    def _fewest(self, count: int) -> int:
        """The smallest ``count`` over ranks (every rank calls this together)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return count
        t = torch.tensor([count], dtype=torch.long, device=self.module.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def rollout(self, epoch: int) -> tuple[RolloutBatch, RolloutStats]:
        _, world = self._world()
        t0 = time.perf_counter()
        if epoch not in self._inflight:  # else: pushed after the round in flight is collected
            self._sync_engine()
        start = self.walk.epoch_start(epoch)
        P = self.prompts_per_rollout
        sampled = sample_rounds(lambda r: self._generate_round(self._rows_at(start + r * P), epoch, r),
                                needed=P // world, dynamic=self.drop_zero_std_groups,
                                max_rounds=self.max_sampling_rounds, fewest=self._fewest)
        self.walk.finished(epoch, start, sampled.rounds)
        self.engine.release()  # scoring and training get the engine's memory (vLLM sleep mode)
        t_gen = time.perf_counter() - t0
        if sampled.padded and not self._warned_filler:  # once: rollout/dropped_group_frac tracks it after
            self._warned_filler = True
            self._say(f"dynamic sampling: after {sampled.rounds} rounds (data.max_sampling_rounds) only "
                      f"{len(sampled.chosen) - len(sampled.padded)} of {len(sampled.chosen)} prompt groups had reward "
                      "variance; the rest are zero-variance groups trained with no weight (warned once; raise "
                      "data.max_sampling_rounds to fill the rollout)")
        batch = self._build(sampled)
        t1 = time.perf_counter()
        # With one pass, the first update is on-policy and scores its own minibatch (score_rollout);
        # the engine-mismatch diagnostics and TIS need every row's old log-probs now.
        defer = self.ppo_epochs == 1 and batch.engine_logprobs is None
        batch = self.module.score_rollout(batch, self.minibatch_indices(len(batch), epoch)[0], defer_first=defer)
        t_score = time.perf_counter() - t1
        diff = behaviour = None
        if self._correction is not None and batch.engine_logprobs is None:
            key = "data.tis_cap" if self.tis_cap is not None else "data.behaviour_correction"
            raise ConfigError(f"{key} needs the rollout engine's log-probs: set "
                              "data.engine.init_args.return_logprobs: true")
        if batch.engine_logprobs is not None:
            diff = (batch.engine_logprobs - batch.old_logprobs).abs()[batch.completion_mask].float().cpu()
            behaviour = apply_behaviour_correction(batch, self._correction)  # weights folded into advantages
        return batch, self._stats(epoch, sampled, t0, t_gen, t_score, diff, behaviour)

    def _build(self, sampled: SampledRollout) -> RolloutBatch:
        """The trained groups packed into one batch on the module's device, filler and (with
        ``mask_truncated``) truncated completions masked."""
        groups = sampled.generated.take(sampled.chosen)
        G = self.num_generations
        batch = build_rollout_batch(
            prompt_ids=[p for p in groups.prompt_ids for _ in range(G)], completion_ids=groups.completion_ids,
            pad_id=self.tokenizer.pad_token_id, advantages=groups.advantages, rewards=groups.rewards,
            engine_logprobs=groups.engine_logprobs, temperature=self.temperature)
        if self.mask_truncated:
            batch.completion_mask &= ~torch.tensor(groups.truncated, dtype=torch.bool).unsqueeze(1)
        if sampled.padded:
            batch.completion_mask[len(sampled.chosen) * G - len(sampled.padded) * G:] = False
        return batch.to(self.module.device)

    def _stats(self, epoch, sampled: SampledRollout, t0, t_gen, t_score, diff, behaviour) -> RolloutStats:
        stats = rollout_stats(sampled, epoch=epoch, generation_time_s=t_gen, scoring_time_s=t_score,
                              rollout_time_s=time.perf_counter() - t0, engine_logprob_diff=diff,
                              is_weights=behaviour.weights if behaviour and self.tis_cap is not None else None,
                              is_cap=self.tis_cap or 0.0, samples=self.num_samples_logged,
                              behaviour_ratio=behaviour.ratios if behaviour else None,
                              behaviour_masked=behaviour.masked if behaviour else 0,
                              generation_wait_s=sum(w for w, _ in self._round_times),
                              engine_generation_s=sum(g for _, g in self._round_times),
                              weight_sync_s=self._take_sync_s())
        if stats.prompt_truncated and not self._warned_truncation:
            self._warned_truncation = True
            self._say(f"data.max_prompt_length: {stats.prompt_truncated} of {stats.num_groups} prompts of this "
                      f"rollout were longer than {self.max_prompt_length} tokens and lost their first tokens "
                      "(logged as rollout/prompt_truncated_frac); raise it, or set data.filter_overlong_prompts: "
                      "true to drop such prompts at load")
        return stats

    def num_minibatches(self, rollout_size: int | None = None) -> int:
        """Optimizer steps per pass: fixed by the configured sizes, the same on every rank."""
        _, world = self._world()
        return minibatching.count((self.prompts_per_rollout // world) * self.num_generations, self.minibatch_size)

    def minibatch_indices(self, rows: int, epoch: int) -> list[list[torch.Tensor]]:
        """Row indices of every minibatch, per pass (``minibatching.indices``)."""
        return minibatching.indices(rows, self.num_minibatches(), self.ppo_epochs, self.seed, epoch)

    def minibatches(self, batch: RolloutBatch, epoch: int) -> list[RolloutBatch]:
        return minibatching.serve(batch, self.minibatch_indices(len(batch), epoch))

    # ----- validation (espo_lightning.evaluation) ----------------------------------------------
    def val_dataloader(self) -> DataLoader | list:
        if not self.evaluator.specs:
            return []
        chunks = self.evaluator.chunks(self._loaded, *self._world())
        return DataLoader(Items(chunks), batch_size=None, collate_fn=lambda x: x)

    def evaluate(self, chunk) -> None:
        """One validation step (a chunk of one set) on the engine, with the policy's current weights.

        ``trainer.validate`` runs its steps under ``torch.inference_mode()`` wherever the process
        group is not gloo (NCCL: ``lightning.pytorch.loops.utilities._no_grad_context``), and the
        weight sync cannot run there: ``state_dict()`` of FSDP2's DTensor parameters raises "Cannot
        set version_counter for inference tensor". Evaluation needs no autograd either way, so it
        runs under plain ``no_grad`` whatever the caller chose (as fit's own validation does)."""
        with torch.inference_mode(False), torch.no_grad():
            self._sync_engine()
            self.engine.activity = "evaluating"
            self.evaluator.run(chunk, encoder=self.encoder, engine=self.engine, policy=self.module.policy,
                               tokenizer=self.tokenizer, rewarder=self.rewarder,
                               precision_context=self._generation_context)

    def finish_evaluation(self) -> dict[str, float]:
        """Every set's metrics, global and the same on every rank; writes the summary and samples."""
        self.engine.release()
        return self.evaluator.finish(self.trainer, self.module.model_name_or_path, self.checkpoint_step)

    def _generation_context(self):
        """The training step's precision (autocast under bf16-mixed) for an engine that runs the
        policy module itself (HF generate); none for one with weights and kernels of its own (vLLM)."""
        return self.module.precision_context() if self.engine.uses_trainer_precision else nullcontext()


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")
