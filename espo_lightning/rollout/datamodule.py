"""The rollout DataModule: every epoch it samples G completions for P prompts with the rollout
engine, scores them with the reward functions, computes advantages, lets the policy score old
log-probs and entropies, and serves the result as minibatches for ``ppo_epochs`` passes.

Under several ranks each rank owns whole prompt groups (P / world_size prompts), so advantages need
no communication; every rank serves the same number of minibatches so collectives stay in step."""
from __future__ import annotations

import math
import random
import time
import warnings
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from espo_lightning.advantages import group_advantages, rewards_to_tensor
from espo_lightning.data.source import PromptSource
from espo_lightning.errors import ConfigError
from espo_lightning.rollout.batch import RolloutBatch, ServedBatch
from espo_lightning.rollout.engines.base import RolloutEngine, Sampling
from espo_lightning.rollout.engines.hf import HFEngine
from espo_lightning.rollout.mismatch import truncated_is_weights
from espo_lightning.rollout.rewarding import combined_rewards, score_completions
from espo_lightning.rollout.stats import RolloutStats
from espo_lightning.rollout.tensors import build_rollout_batch


# _Items defines __len__ on purpose (progress bar, epoch length) and is never split across workers.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


class _Items(IterableDataset):
    """A fixed list served in order. Iterable, so Lightning adds no DistributedSampler: the
    sharding is ours (by prompt group for training, by row for validation)."""

    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class RolloutDataModule(L.LightningDataModule):
    """Generates, scores and serves one rollout per epoch.

    Args:
        train_data: Prompt source for rollouts (``FilePromptSource``, ``AdditionSource``, ...).
        reward_funcs: Reward functions ``f(prompts, completions, **columns) -> list[float | None]``,
            given as import paths (``espo_lightning.rewards.math_accuracy``) or ``class_path`` objects.
        val_data: Held-out prompts for greedy ``val/accuracy``; none disables validation.
        reward_weights: One weight per reward function (default 1.0 each).
        accuracy_reward: Function whose reward 1.0 means "correct" for ``reward/accuracy`` and
            ``val/accuracy``; defaults to the first reward function.
        engine: Rollout engine (``HFEngine`` or ``VLLMEngine``).
        prompts_per_rollout: P, prompts per epoch over all ranks (divisible by the world size).
        num_generations: G, completions per prompt (>= 2: advantages compare within a group).
        minibatch_size: Responses per optimizer step on each rank; default: the whole rollout.
        ppo_epochs: Passes over each rollout (>1 moves the policy off the sampling policy).
        temperature: Sampling temperature; log-probs and entropies use the same temperature.
        top_p: Nucleus sampling.
        max_new_tokens: Completion budget; completions that hit it without EOS are "truncated".
        max_prompt_length: Longer prompts keep their last tokens.
        use_chat_template: Wrap prompts with the tokenizer's chat template (instruct models).
        system_prompt: System message used with the chat template.
        drop_zero_std_groups: Dynamic sampling: leave out groups whose rewards do not vary.
        mask_truncated: Exclude truncated completions from the loss.
        tis_cap: Truncated importance sampling for the engine/trainer mismatch (off when null): each
            token's loss term is weighted by ``min(pi_old / pi_engine, tis_cap)`` (folded into
            per-token advantages). Needs an engine that returns log-probs.
        val_max_new_tokens: Budget for greedy validation (default: ``max_new_tokens``).
        val_batch_size: Prompts per validation step.
        num_samples_logged: Sample completions kept per rollout for the logs.
        seed: Seed of prompt order and sampling.
    """

    def __init__(
        self,
        train_data: PromptSource,
        reward_funcs: list[Callable],
        val_data: PromptSource | None = None,
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
        use_chat_template: bool = False,
        system_prompt: str | None = None,
        drop_zero_std_groups: bool = False,
        mask_truncated: bool = False,
        tis_cap: float | None = None,
        val_max_new_tokens: int | None = None,
        val_batch_size: int = 64,
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
        _check(val_batch_size >= 1, "data.val_batch_size", "must be >= 1", val_batch_size)
        if not reward_funcs:
            raise ConfigError("data.reward_funcs: give at least one reward function")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ConfigError(f"data.reward_weights: {len(reward_weights)} weights for {len(reward_funcs)} "
                              "reward functions; give one weight per function")
        self.train_data, self.val_data = train_data, val_data
        self.reward_funcs = list(reward_funcs)
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
        self.accuracy_reward = accuracy_reward or reward_funcs[0]
        self.engine = engine if engine is not None else HFEngine()
        self.prompts_per_rollout, self.num_generations = prompts_per_rollout, num_generations
        self.minibatch_size, self.ppo_epochs = minibatch_size, ppo_epochs
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.max_prompt_length = max_prompt_length
        self.use_chat_template, self.system_prompt = use_chat_template, system_prompt
        self.drop_zero_std_groups, self.mask_truncated = drop_zero_std_groups, mask_truncated
        self.tis_cap = tis_cap
        self.val_max_new_tokens = val_max_new_tokens or max_new_tokens
        self.val_batch_size, self.num_samples_logged, self.seed = val_batch_size, num_samples_logged, seed
        self.last_rollout: RolloutStats | None = None
        self._train_rows: list[dict] | None = None
        self._engine_ready = False
        self._synced_step: int | None = None

    # ----- plumbing ---------------------------------------------------------------------------
    @property
    def module(self):
        return self.trainer.lightning_module

    @property
    def tokenizer(self):
        return self.module.tokenizer

    def _world(self) -> tuple[int, int]:
        return self.trainer.global_rank, self.trainer.world_size

    def _ensure_engine(self) -> None:
        if not self._engine_ready:
            self.engine.setup(self.module.policy, self.tokenizer)
            self._engine_ready = True

    def _sync_engine(self) -> None:
        """Push the policy's weights into the engine when they changed since the last push."""
        self._ensure_engine()
        if self._synced_step != self.trainer.global_step:
            self.engine.sync_weights(self.module.policy)
            self._synced_step = self.trainer.global_step

    def check_data(self) -> None:
        """Load the prompt sources now, so a bad path or row fails before any model is loaded."""
        for key, source in (("data.train_data", self.train_data), ("data.val_data", self.val_data)):
            if source is None:
                continue
            try:
                rows = source.rows()
            except (ValueError, FileNotFoundError, ImportError) as err:
                raise ConfigError(f"{key}: {err}") from err
            if not rows:
                raise ConfigError(f"{key}: the prompt source returned no rows")
            where = getattr(source, "path", None) or type(source).__name__
            funcs = self.reward_funcs + [f for f in [self.accuracy_reward] if all(f is not g for g in self.reward_funcs)]
            for func in funcs:  # reward functions that can check their columns up front
                check = getattr(func, "check_rows", None)
                if check is not None:
                    try:
                        check(rows)
                    except ValueError as err:
                        raise ConfigError(f"{key}: {where}: {err}") from err

    def teardown(self, stage: str) -> None:
        if self._engine_ready:
            self.engine.teardown()
            self._engine_ready = False
            self._synced_step = None

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        if self.use_chat_template:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("data.use_chat_template: the tokenizer has no chat template; set it to false")
            ids = []
            for p in prompts:
                messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
                messages.append({"role": "user", "content": p})
                ids.append(list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)))
        else:
            ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
        return [x[-self.max_prompt_length:] for x in ids]

    def _rows(self) -> list[dict]:
        if self._train_rows is None:
            self._train_rows = self.train_data.rows()
            if not self._train_rows:
                raise ConfigError("data.train_data: the prompt source returned no rows")
        return self._train_rows

    def _rollout_rows(self, epoch: int) -> list[dict]:
        """This rank's P / world prompts of ``epoch``: a seeded walk through shuffled passes of the data."""
        rank, world = self._world()
        if self.prompts_per_rollout % world:
            raise ConfigError(f"data.prompts_per_rollout ({self.prompts_per_rollout}) must be divisible by the "
                              f"number of ranks ({world})")
        rows = self._rows()
        start = epoch * self.prompts_per_rollout
        orders: dict[int, list[int]] = {}  # one shuffle per pass over the data
        chosen = []
        for k in range(start, start + self.prompts_per_rollout):
            data_pass, offset = divmod(k, len(rows))
            if data_pass not in orders:
                orders[data_pass] = list(range(len(rows)))
                random.Random(self.seed * 1_000_003 + data_pass).shuffle(orders[data_pass])
            chosen.append(rows[orders[data_pass][offset]])
        return chosen[rank::world]

    # ----- the rollout ------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        batch, stats = self.rollout(epoch)
        self.last_rollout = stats
        return DataLoader(_Items([ServedBatch(b) for b in self.minibatches(batch, epoch)]), batch_size=None)

    def rollout(self, epoch: int) -> tuple[RolloutBatch, RolloutStats]:
        rank, _ = self._world()
        rows = self._rollout_rows(epoch)
        G = self.num_generations
        t0 = time.perf_counter()
        self._sync_engine()
        prompt_ids = self.encode_prompts([r["prompt"] for r in rows])
        sampling = Sampling(n=G, temperature=self.temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, seed=self.seed * 7919 + epoch * 104_729 + rank)
        with self.module.precision_context():  # HF generate samples under the training step's precision
            gen = self.engine.generate(prompt_ids, sampling, self.module.policy)
        t_gen = time.perf_counter() - t0

        completions = self.tokenizer.batch_decode(gen.token_ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        columns["completion_ids"] = gen.token_ids  # as TRL passes them (length-based rewards read them)
        per_func = score_completions(self.reward_funcs, prompts, completions, columns)
        rewards = rewards_to_tensor(combined_rewards(self.reward_funcs, self.reward_weights, prompts, completions,
                                                     columns, per_func))
        # The accuracy reward is usually one of the reward functions: reuse its scores, don't verify twice.
        known = next((v for f, v in zip(self.reward_funcs, per_func) if f is self.accuracy_reward), None)
        correct = self._correct(prompts, completions, columns, known)
        advantages = group_advantages(rewards, G)

        batch = build_rollout_batch(
            prompt_ids=[p for p in prompt_ids for _ in range(G)], completion_ids=gen.token_ids,
            pad_id=self.tokenizer.pad_token_id, advantages=advantages, rewards=rewards,
            engine_logprobs=gen.logprobs, temperature=self.temperature)
        truncated = torch.tensor(gen.truncated, dtype=torch.float32)
        if self.mask_truncated:
            batch.completion_mask &= ~truncated.bool().unsqueeze(1)
        zero_groups = (advantages.view(-1, G) == 0).all(dim=1)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if self.drop_zero_std_groups:
            keep = ~zero_groups.repeat_interleave(G)
        dropped_groups = int((~keep).sum()) // G
        # Rows are dropped before scoring: scoring uses the minibatches training will cut, and
        # nothing is spent on rows that are never trained on.
        batch = self._apply_dynamic_sampling(batch, keep).to(self.module.device)
        t1 = time.perf_counter()
        batch = self.module.score_rollout(batch, self.minibatch_indices(len(batch), epoch)[0])
        t_score = time.perf_counter() - t1
        diff = is_weights = None
        if batch.engine_logprobs is not None:
            diff = (batch.engine_logprobs - batch.old_logprobs).abs()[batch.completion_mask].float().cpu()
        if self.tis_cap is not None:
            is_weights = self._apply_tis(batch)
        stats = RolloutStats(
            epoch=epoch, rewards=rewards, correct=correct,
            response_lengths=torch.tensor([len(c) for c in gen.token_ids], dtype=torch.float32),
            truncated=truncated, zero_std_groups=int(zero_groups.sum()), num_groups=len(rows),
            dropped_groups=dropped_groups, generation_time_s=t_gen, scoring_time_s=t_score,
            rollout_time_s=time.perf_counter() - t0, generated_tokens=sum(len(c) for c in gen.token_ids),
            engine_logprob_diff=diff,
            samples=[{"prompt": prompts[i], "completion": completions[i],
                      "reward": None if rewards[i].isnan() else float(rewards[i])}
                     for i in range(0, len(prompts), G)][: self.num_samples_logged],
            is_weights=is_weights, is_cap=self.tis_cap or 0.0)
        return batch, stats

    def _apply_tis(self, batch: RolloutBatch) -> torch.Tensor:
        """Weight each token by min(pi_old / pi_engine, cap). A positive, detached weight on a token's
        term equals scaling its advantage (the clip decisions depend only on the sign of A), so the
        correction becomes per-token advantages and every loss supports it unchanged."""
        if batch.engine_logprobs is None:
            raise ConfigError("data.tis_cap needs the rollout engine's log-probs: set "
                              "data.engine.init_args.return_logprobs: true")
        w = truncated_is_weights(batch.old_logprobs, batch.engine_logprobs, batch.completion_mask, self.tis_cap)
        adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages.unsqueeze(1)
        batch.advantages = adv * w  # [B, Lc]
        return w[batch.completion_mask].float().cpu()

    def _correct(self, prompts, completions, columns, values=None) -> torch.Tensor:
        if values is None:
            values = score_completions([self.accuracy_reward], prompts, completions, columns)[0]
        return torch.tensor([1.0 if v is not None and v >= 1.0 - 1e-6 else 0.0 for v in values])

    def _apply_dynamic_sampling(self, batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
        """Drop zero-variance groups. Every rank must still serve the same number of minibatches, so
        at least one row per minibatch is kept; rows kept only for that get an empty mask (no weight)."""
        if keep.all():
            return batch
        needed = self.num_minibatches(len(batch))
        if int(keep.sum()) < needed:
            extra = (~keep).nonzero().flatten()[: needed - int(keep.sum())]
            batch.completion_mask[extra.to(batch.completion_mask.device)] = False
            keep[extra] = True
        return batch.select(keep.nonzero().flatten().to(batch.input_ids.device))

    def num_minibatches(self, rollout_size: int | None = None) -> int:
        """Optimizer steps per pass: fixed by the configured sizes, the same on every rank."""
        _, world = self._world()
        per_rank = (self.prompts_per_rollout // world) * self.num_generations
        return 1 if self.minibatch_size is None else max(1, math.ceil(per_rank / self.minibatch_size))

    def minibatch_indices(self, rows: int, epoch: int) -> list[list[torch.Tensor]]:
        """Row indices of every minibatch, per pass (``ppo_epochs`` lists): a seeded shuffle per
        pass. The rollout's scoring reads the first pass's, so it must be a pure function of
        (rows, epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 31 + epoch)
        n = self.num_minibatches()
        return [list(torch.tensor_split(torch.randperm(rows, generator=gen), n)) for _ in range(self.ppo_epochs)]

    def minibatches(self, batch: RolloutBatch, epoch: int) -> list[RolloutBatch]:
        device = batch.input_ids.device
        return [batch.select(idx.to(device)).trimmed()
                for one_pass in self.minibatch_indices(len(batch), epoch) for idx in one_pass]

    # ----- validation -------------------------------------------------------------------------
    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        rank, world = self._world()
        all_rows = self.val_data.rows()
        per_rank = math.ceil(len(all_rows) / world)
        rows = all_rows[rank::world]
        # Every rank runs the same number of steps (sharded generation is a collective); a rank
        # short of rows repeats one with weight 0, so the global accuracy is over the real rows only.
        rows = rows + [{**all_rows[0], "_weight": 0.0}] * (per_rank - len(rows))
        chunks = [rows[i : i + self.val_batch_size] for i in range(0, len(rows), self.val_batch_size)]
        return DataLoader(_Items(chunks), batch_size=None, collate_fn=lambda x: x)

    def evaluate(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy completions of ``rows``: (1.0 where the accuracy reward says correct, row weight)."""
        self._sync_engine()
        prompt_ids = self.encode_prompts([r["prompt"] for r in rows])
        with self.module.precision_context():
            gen = self.engine.generate(prompt_ids, Sampling(n=1, greedy=True, max_new_tokens=self.val_max_new_tokens),
                                       self.module.policy)
        completions = self.tokenizer.batch_decode(gen.token_ids, skip_special_tokens=True)
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "_weight")}
        columns["completion_ids"] = gen.token_ids
        weight = torch.tensor([r.get("_weight", 1.0) for r in rows])
        correct = self._correct([r["prompt"] for r in rows], completions, columns)
        return correct.to(self.module.device), weight.to(self.module.device)


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")
