"""``RolloutMonitor``: what the epoch's rollout looked like and how fast generation and updates ran."""
from __future__ import annotations

import math
import time

import lightning as L
import torch

from callbacks.base import distributed, step_batch, step_diagnostics, tensorboard_writers, write_metrics
from callbacks.layout import write_layout

# Per-rank quantities that add up across ranks, and those whose global value is the largest one.
SUM_KEYS = ("responses", "scored", "reward_sum", "reward_sq_sum", "correct", "length_sum", "truncated",
            "zero_std_groups", "dropped_groups", "groups", "generated_tokens", "diff_count", "diff_sum",
            "train_tokens", "tis_count", "tis_sum", "tis_capped", "prompt_truncated", "reward_timeouts",
            "ratio_count", "ratio_sum", "ratio_masked")
# ``ratio_neg_min`` holds minus the smallest behaviour ratio, so that MAX reduces it too.
MAX_KEYS = ("rollout_time", "generation_time", "scoring_time", "update_time", "length_max", "diff_max",
            "sampling_rounds", "ratio_max", "ratio_neg_min", "staleness", "generation_wait", "engine_generation",
            "weight_sync")


class RolloutMonitor(L.Callback):
    """Once per epoch, from the DataModule's ``last_rollout`` (``RolloutStats``) and the update timing.

    Every number is global over ranks: per-rank sums and counts are added (``all_reduce`` SUM), maxima
    and wall times take the largest rank (``all_reduce`` MAX); per-rank means are never averaged.

    Logged at the end of each training epoch, over every response generated (all sampling rounds,
    kept or not: what the policy does, not what dynamic sampling chose):

    - ``reward/mean``, ``reward/std`` (sample std, n - 1) over the scored responses;
      ``reward/accuracy`` (fraction of all responses the accuracy reward calls correct);
      ``reward/unscored_frac`` (responses the verifier could not score); ``reward/timeout_frac``
      (responses on which a reward function hit ``data.reward_timeout_s``).
    - ``rollout/response_len_mean``, ``rollout/response_len_max`` (generated tokens incl. EOS),
      ``rollout/truncated_frac``, ``rollout/zero_std_group_frac`` (prompt groups whose advantages are
      all 0), ``rollout/dropped_group_frac`` (generated groups dynamic sampling left without weight:
      zero-variance ones and surplus ones of the last round), ``rollout/sampling_rounds`` (generation
      rounds of the rollout), ``rollout/staleness`` (how many rollouts old the weights it was sampled
      from were: 0, or up to ``data.max_staleness``), ``rollout/prompt_truncated_frac`` (prompts cut to
      ``data.max_prompt_length``),
      ``rollout/engine_logprob_diff_mean`` / ``_max`` (|engine - trainer| log-prob of the sampled
      tokens; only when the engine returns log-probs),
      ``rollout/behaviour_ratio/mean``, ``/min``, ``/max`` (the raw ratio ``pi_old / pi_engine`` of
      the sampled tokens, whatever ``data.behaviour_correction`` chose, also when it is off) and
      ``/masked_frac`` (valid tokens the correction gave weight 0: mask, icepop), also only when the
      engine returns log-probs; ``rollout/tis_weight_mean``, ``rollout/tis_capped_frac`` with
      ``data.tis_cap``.
    - ``perf/rollout_time_s`` (generation + rewards + scoring, slowest rank), ``perf/generation_time_s``,
      ``perf/scoring_time_s``, ``perf/rollout_tokens_per_s`` (all ranks' generated tokens per second
      of rollout time), ``perf/generation_tokens_per_s`` (per second of generation time),
      ``perf/update_time_s`` (time spent in the epoch's training steps, from ``on_train_batch_start``
      to ``on_train_batch_end``, slowest rank) and ``perf/train_tokens_per_s`` (valid tokens trained
      on all ranks, counted once per pass, per second of update time).
      ``perf/generation_wait_s`` (the trainer blocked on the rollout's generation: the whole call in
      process, only the rest of a generation submitted in the background with ``data.max_staleness``),
      ``perf/engine_generation_s`` (the engine's own time on it, request to answer) and
      ``perf/generation_hidden_frac`` (1 - wait / engine time: the share of generation that ran while
      the trainer trained; 0 when synchronous), ``perf/weight_sync_s`` (the trainer's time pushing the
      policy's weights to the engine since the previous rollout: before its generation, before an
      evaluation, before a submission with ``data.max_staleness``; slowest rank; near 0 for the HF
      engine, which samples from the policy itself).
    - ``rollout/samples``: a few sample completions with their rewards as TensorBoard text (rank 0's).

    Args:
        num_samples: Sample completions written as text per epoch (0 disables).
    """

    def __init__(self, num_samples: int = 4) -> None:
        super().__init__()
        if num_samples < 0:
            raise ValueError(f"RolloutMonitor: num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self._update_time = 0.0
        self._train_tokens = 0.0
        self._batch_start: float | None = None
        self._logged_rollout: int | None = None

    @staticmethod
    def _rollout(trainer):
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(datamodule, "last_rollout", None)

    def on_train_start(self, trainer, pl_module) -> None:
        write_layout(trainer)  # TensorBoard's Custom Scalars tab (callbacks/layout.py): reward with accuracy

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._update_time, self._train_tokens, self._batch_start = 0.0, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self._update_time += time.perf_counter() - self._batch_start
            self._batch_start = None
        diag = step_diagnostics(outputs)
        tokens = diag.get("count/tokens")
        if tokens is None:
            b = step_batch(outputs, batch)
            tokens = None if b is None else b.completion_mask.sum()
        if tokens is not None:  # kept on the device: no host synchronisation per step
            self._train_tokens = self._train_tokens + tokens.detach().float()

    def rank_totals(self, stats) -> tuple[dict[str, float], dict[str, float]]:
        """This rank's additive quantities and maxima (zeros when there is no rollout)."""
        sums = dict.fromkeys(SUM_KEYS, 0.0)
        maxes = dict.fromkeys(MAX_KEYS, 0.0)
        sums["train_tokens"] = float(self._train_tokens)
        maxes["update_time"] = self._update_time
        maxes["diff_max"] = maxes["ratio_max"] = maxes["ratio_neg_min"] = -math.inf
        if stats is None:
            return sums, maxes
        rewards = stats.rewards.double().cpu()
        scored = rewards[~rewards.isnan()]
        lengths = stats.response_lengths.double().cpu()
        sums.update(responses=float(rewards.numel()), scored=float(scored.numel()), reward_sum=float(scored.sum()),
                    reward_sq_sum=float((scored * scored).sum()), correct=float(stats.correct.double().sum()),
                    length_sum=float(lengths.sum()), truncated=float(stats.truncated.double().sum()),
                    zero_std_groups=float(stats.zero_std_groups), dropped_groups=float(stats.dropped_groups),
                    groups=float(stats.num_groups), generated_tokens=float(stats.generated_tokens),
                    prompt_truncated=float(getattr(stats, "prompt_truncated", 0)),
                    reward_timeouts=float(getattr(stats, "reward_timeouts", 0)))
        maxes.update(rollout_time=float(stats.rollout_time_s), generation_time=float(stats.generation_time_s),
                     scoring_time=float(stats.scoring_time_s),
                     length_max=float(lengths.max()) if lengths.numel() else 0.0,
                     sampling_rounds=float(getattr(stats, "sampling_rounds", 1)),
                     staleness=float(getattr(stats, "staleness", 0)),
                     generation_wait=float(getattr(stats, "generation_wait_s", 0.0)),
                     engine_generation=float(getattr(stats, "engine_generation_s", 0.0)),
                     weight_sync=float(getattr(stats, "weight_sync_s", 0.0)))
        diff = stats.engine_logprob_diff
        if diff is not None and diff.numel():
            diff = diff.double().cpu()
            sums.update(diff_count=float(diff.numel()), diff_sum=float(diff.sum()))
            maxes["diff_max"] = float(diff.max())
        ratio = getattr(stats, "behaviour_ratio", None)
        if ratio is not None and ratio.numel():
            ratio = ratio.double().cpu()
            sums.update(ratio_count=float(ratio.numel()), ratio_sum=float(ratio.sum()),
                        ratio_masked=float(getattr(stats, "behaviour_masked", 0)))
            maxes.update(ratio_max=float(ratio.max()), ratio_neg_min=-float(ratio.min()))
        tis = getattr(stats, "is_weights", None)
        if tis is not None and tis.numel():
            tis = tis.double().cpu()
            sums.update(tis_count=float(tis.numel()), tis_sum=float(tis.sum()),
                        tis_capped=float((tis >= stats.is_cap * (1 - 1e-6)).sum()))
        return sums, maxes

    @staticmethod
    def reduce(sums: dict[str, float], maxes: dict[str, float], device) -> tuple[dict[str, float], dict[str, float]]:
        """Global sums and maxima over ranks (two ``all_reduce`` calls when distributed)."""
        if not distributed():
            return sums, maxes
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        s = torch.tensor([sums[k] for k in SUM_KEYS], dtype=dtype, device=device)
        m = torch.tensor([maxes[k] for k in MAX_KEYS], dtype=dtype, device=device)
        torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        return dict(zip(SUM_KEYS, s.cpu().tolist())), dict(zip(MAX_KEYS, m.cpu().tolist()))

    @staticmethod
    def summarize(s: dict[str, float], m: dict[str, float]) -> dict[str, float]:
        """The logged values from global sums and maxima; a value without data is left out."""
        out: dict[str, float] = {}
        if s["scored"] > 0:
            mean = s["reward_sum"] / s["scored"]
            out["reward/mean"] = mean
            n = s["scored"]
            var = (s["reward_sq_sum"] - n * mean * mean) / (n - 1) if n > 1 else 0.0
            out["reward/std"] = math.sqrt(max(var, 0.0))
        if s["responses"] > 0:
            n = s["responses"]
            out["reward/accuracy"] = s["correct"] / n
            out["reward/unscored_frac"] = (n - s["scored"]) / n
            out["reward/timeout_frac"] = s["reward_timeouts"] / n
            out["rollout/response_len_mean"] = s["length_sum"] / n
            out["rollout/response_len_max"] = m["length_max"]
            out["rollout/truncated_frac"] = s["truncated"] / n
            out["perf/rollout_time_s"] = m["rollout_time"]
            out["perf/generation_time_s"] = m["generation_time"]
            out["perf/scoring_time_s"] = m["scoring_time"]
            if m["rollout_time"] > 0:
                out["perf/rollout_tokens_per_s"] = s["generated_tokens"] / m["rollout_time"]
            if m["generation_time"] > 0:
                out["perf/generation_tokens_per_s"] = s["generated_tokens"] / m["generation_time"]
            if m["engine_generation"] > 0:  # generation hidden behind training (data.max_staleness)
                out["perf/generation_wait_s"] = m["generation_wait"]
                out["perf/engine_generation_s"] = m["engine_generation"]
                out["perf/generation_hidden_frac"] = max(0.0, 1.0 - m["generation_wait"] / m["engine_generation"])
            if m["weight_sync"] > 0:  # pushes since the previous rollout (vLLM: the whole state dict)
                out["perf/weight_sync_s"] = m["weight_sync"]
        if s["groups"] > 0:
            out["rollout/zero_std_group_frac"] = s["zero_std_groups"] / s["groups"]
            out["rollout/dropped_group_frac"] = s["dropped_groups"] / s["groups"]
            out["rollout/prompt_truncated_frac"] = s["prompt_truncated"] / s["groups"]
            out["rollout/sampling_rounds"] = m["sampling_rounds"]
            out["rollout/staleness"] = m["staleness"]
        if s["diff_count"] > 0:
            out["rollout/engine_logprob_diff_mean"] = s["diff_sum"] / s["diff_count"]
            out["rollout/engine_logprob_diff_max"] = m["diff_max"]
        if s["ratio_count"] > 0:
            out["rollout/behaviour_ratio/mean"] = s["ratio_sum"] / s["ratio_count"]
            out["rollout/behaviour_ratio/min"] = -m["ratio_neg_min"]
            out["rollout/behaviour_ratio/max"] = m["ratio_max"]
            out["rollout/behaviour_ratio/masked_frac"] = s["ratio_masked"] / s["ratio_count"]
        if s["tis_count"] > 0:
            out["rollout/tis_weight_mean"] = s["tis_sum"] / s["tis_count"]
            out["rollout/tis_capped_frac"] = s["tis_capped"] / s["tis_count"]
        if m["update_time"] > 0:
            out["perf/update_time_s"] = m["update_time"]
            out["perf/train_tokens_per_s"] = s["train_tokens"] / m["update_time"]
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = self._rollout(trainer)
        fresh = stats is not None and getattr(stats, "epoch", None) != self._logged_rollout
        # Whether this rollout was logged already is the same on every rank (same epochs, same reloads).
        sums, maxes = self.rank_totals(stats if fresh else None)
        write_metrics(trainer, self.summarize(*self.reduce(sums, maxes, pl_module.device)), epoch_level=True)
        if fresh:
            self._logged_rollout = getattr(stats, "epoch", None)
            self._write_samples(trainer, stats)

    def _write_samples(self, trainer, stats) -> None:
        samples = list(getattr(stats, "samples", None) or [])[: self.num_samples]
        if not samples:
            return
        text = samples_markdown(samples)
        for writer in tensorboard_writers(trainer):
            writer.add_text("rollout/samples", text, global_step=trainer.global_step)


def samples_markdown(samples: list[dict]) -> str:
    """Samples as Markdown: a heading with the reward, then prompt and completion as indented code
    blocks (which no content can break out of)."""
    blocks = []
    for i, sample in enumerate(samples):
        reward = sample.get("reward")
        reward_text = "unscored" if reward is None else f"{reward:g}"
        blocks.append(f"**sample {i}** &nbsp; reward: **{reward_text}**\n\nprompt:\n\n{_code(sample.get('prompt', ''))}"
                      f"\n\ncompletion:\n\n{_code(sample.get('completion', ''))}")
    return "\n\n---\n\n".join(blocks)


def _code(text) -> str:
    lines = str(text).splitlines() or [""]
    return "\n".join("    " + line for line in lines)
