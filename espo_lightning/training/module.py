"""The LightningModule: a policy, an optional frozen reference model, and a policy loss.

``training_step`` takes one typed rollout minibatch (``RolloutBatch``) and makes one optimizer step
on it: the minibatch is split into micro-batches (``model.micro_batch_size``,
``model.max_tokens_per_micro_batch``) whose gradients accumulate, each loss divided by the whole
minibatch's counts over all ranks, so the step is the same as one pass over the minibatch. It
returns the loss plus the loss's diagnostics for the whole minibatch; callbacks in ``callbacks/``
read those from the step output (see ``callbacks/base.py`` for the contract)."""
from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from espo_lightning.policy.attention import resolve_attn_implementation
from espo_lightning.policy.lora import LoraSettings
from espo_lightning.training.checkpoint_keys import check_keys, drop_reference, skip_reference
from espo_lightning.training.cpu_heap import retain_freed_heap
from espo_lightning.errors import ConfigError
from espo_lightning.training.grad_norm import clip_with_shared_norm, total_grad_norm
from espo_lightning.training.log_writer import show_reward, step_is_logged, write_metrics
from espo_lightning.losses import ESPOLoss, PolicyLoss
from espo_lightning.losses.base import Normalizer
from espo_lightning.training.micro_batches import is_one_pass, plan_micro_batches
from espo_lightning.training.old_policy import fill_old_policy, is_unscored, score_rollout
from espo_lightning.policy.policy_setup import check_optimizer, disable_dropout
from espo_lightning.rollout.batch import RolloutBatch, ServedBatch, unwrap
from espo_lightning.policy.scoring import TokenScorer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-6)


class PolicyModule(L.LightningModule):
    """RL fine-tuning of a causal LM with a policy-gradient loss (ESPO by default).

    Args:
        model_name_or_path: A local folder or hub name that ``AutoModelForCausalLM.from_pretrained`` loads.
        loss: The policy loss (``espo_lightning.losses.ESPOLoss``, ``GSPOLoss``, ``GRPOLoss``, ...).
        optimizer: Optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-6}}``.
        lr_scheduler: Optional scheduler factory (stepped every optimizer step).
        model_builder: Optional callable ``builder(path)`` that creates the checkpoint at
            ``model_name_or_path`` when it is missing (the embedded default uses
            ``espo_lightning.tasks.addition.AdditionModelBuilder``).
        reference_model: Checkpoint of the frozen KL reference; defaults to ``model_name_or_path``.
            Loaded only when the loss has ``beta > 0``.
        dtype: Weight dtype when loading ("float32", "bfloat16", "float16"). For bf16 training with
            fp32 master weights keep float32 here and set ``trainer.precision: bf16-mixed``.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        attn_implementation: Passed to ``from_pretrained`` (e.g. "sdpa", "flash_attention_2"). "auto":
            "flash_attention_2" on a GPU with the ``flash_attn`` package (varlen kernels, no padding
            mask), else "sdpa" (``espo_lightning.policy.attention``).
        trust_remote_code: Passed to ``from_pretrained``.
        micro_batch_size: Responses per forward/backward pass on a rank; one optimizer step still
            covers the whole minibatch (``data.minibatch_size``), with gradients accumulated over its
            micro-batches and the loss normalised over the whole minibatch. None: no limit.
        max_tokens_per_micro_batch: Padded tokens (responses x width) per forward/backward pass:
            responses sorted by length are packed up to this budget, each micro-batch trimmed to its
            own longest sequence. Combines with ``micro_batch_size``; None: no limit. Old-policy
            scoring uses the same micro-batches.
        logprob_chunk_size: Token positions per chunk of ``[chunk, V]`` logits when computing
            log-probs and entropies (the fused head holds about three such buffers). None: 2**26 / V
            positions, i.e. 256 MiB per fp32 buffer (441 positions at V = 151,936).
        fused_lm_head: Compute log-probs and entropies from the final hidden states in chunks
            (never materialising ``[B, T, V]`` logits); models whose head cannot be reached fall
            back to the logits path with a log line. False always uses the logits path.
        packing: Run every forward (old-policy scoring, training passes, the reference) padding-free:
            each micro-batch's rows concatenated into one sequence with positions restarting per row
            (``espo_lightning.policy.packing``); ``max_tokens_per_micro_batch`` then counts real
            tokens. Same numbers as the padded passes, less compute on long-tailed lengths. Refused
            for a model whose attention cannot take packed input.
        disable_dropout: Set every dropout probability of the policy to 0 (as TRL does), so that
            old-policy scoring and the training passes compute the same function.
        defer_grad_sync: Under DDP/FSDP2, reduce gradients over ranks only on the last micro-batch
            of a step. With FSDP2 this keeps full (unsharded) gradients between micro-batches;
            False reduce-scatters after every micro-batch instead (less memory, more communication).
        export_dir: If set, the trained policy and tokenizer are saved there (``save_pretrained``)
            when fit ends; transformers and vLLM load the folder directly. A relative path is taken
            inside the run's log folder (next to its checkpoints and config.yaml).
        retain_cpu_heap: For a policy on the CPU under glibc, keep freed heap memory for the next
            step instead of returning it to the OS after every backward (``espo_lightning.training.cpu_heap``:
            process-wide, up to 64 MiB per malloc arena kept; 5% of a small model's CPU loop).
        lora: Train LoRA adapters on the frozen policy instead of every weight (needs ``peft``;
            ``espo_lightning.policy.lora``, docs/lora.md). With ``beta > 0`` the KL reference is the
            policy with its adapters off (no second model) unless ``reference_model`` names another
            checkpoint. None: full fine-tuning.
        export_merged: With ``lora`` and ``export_dir``: also write the merged model (base + adapters)
            as a plain HF folder in ``<export_dir>/merged``, next to the adapter folder.
    """

    def __init__(
        self,
        model_name_or_path: str,
        loss: PolicyLoss | None = None,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        model_builder: Callable[[str], None] | None = None,
        reference_model: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        logprob_chunk_size: int | None = None,
        fused_lm_head: bool = True,
        packing: bool = False,
        disable_dropout: bool = True,
        defer_grad_sync: bool = True,
        export_dir: str | None = None,
        retain_cpu_heap: bool = True,
        lora: LoraSettings | None = None,
        export_merged: bool = False,
    ):
        super().__init__()
        for key, value in (("logprob_chunk_size", logprob_chunk_size), ("micro_batch_size", micro_batch_size),
                           ("max_tokens_per_micro_batch", max_tokens_per_micro_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"model.{key} must be an integer >= 1 or null, got {value!r}")
        self.model_name_or_path = model_name_or_path
        self.loss_fn = loss if loss is not None else ESPOLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.model_builder = model_builder
        self.reference_path = reference_model or model_name_or_path
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = resolve_attn_implementation(attn_implementation)
        self.trust_remote_code = trust_remote_code
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.packing = packing
        self.scorer = TokenScorer(logprob_chunk_size, fused_head=fused_lm_head, packing=packing)
        self.disable_dropout = disable_dropout
        self.defer_grad_sync = defer_grad_sync
        self.export_dir = export_dir
        self.retain_cpu_heap = retain_cpu_heap
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora  # a dict from Python callers
        self.export_merged = export_merged
        self.policy = None
        self._grad_norm, self._trained = None, None  # this step's (norm,) (gradient_norm); configure_optimizers
        self.reference = None
        self.tokenizer = None
        # Loading is strict: the frozen reference, never saved, is skipped explicitly (a load hook
        # takes its keys off the missing list), so any other missing or unexpected key is an error.
        self.strict_loading = True
        self.register_load_state_dict_post_hook(skip_reference)
        check_optimizer(optimizer)

    # ----- models -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.model_builder is not None:  # local rank 0 only; Lightning barriers afterwards
            self.model_builder(self.model_name_or_path)

    def _load(self, path: str, empty: bool = False):
        """The causal LM at ``path``; ``empty``: built from its config without weights (meta
        parameters) for ``espo_lightning.policy.loading.load_into_shards`` to fill after sharding."""
        from transformers import AutoModelForCausalLM

        kwargs = self._load_kwargs()
        if empty:
            from espo_lightning.policy.loading import build_empty

            return build_empty(path, **kwargs)
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as err:
            raise ConfigError(f"model.model_name_or_path: cannot load a causal LM from {path!r} ({err})") from err

    def _load_kwargs(self) -> dict:
        kwargs = {"dtype": DTYPES[self.dtype_name], "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def configure_model(self) -> None:
        """Builds the models here so sharding (FSDP2 ``fully_shard``) is a strategy choice. Under FSDP2
        on several ranks they are built empty, sharded, then filled from rank 0's read of the
        checkpoint (``espo_lightning.policy.loading``): no rank holds a full copy of the weights."""
        if self.policy is not None:
            return
        from transformers import AutoTokenizer

        from espo_lightning.policy.sharding import shard_models, streams_weights

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        empty = streams_weights(self) and self.lora is None  # LoRA: each rank loads the base, wraps, shards
        self.policy = self._load(self.model_name_or_path, empty).train()  # from_pretrained returns eval mode
        if self.disable_dropout:
            disable_dropout(self.policy)
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(self.loss_fn, "vocab_size", 1) is None:
            self.loss_fn.set_vocab_size(self.policy.config.vocab_size)
        if self.lora is not None:
            from espo_lightning.policy.lora import wrap_policy

            self.policy = wrap_policy(self.policy, self.lora)
        if self.loss_fn.needs_reference and not self._reference_is_base():
            self.reference = self._load(self.reference_path, empty).eval().requires_grad_(False)
        shard_models(self)
        if self.lora is not None:
            self._configure_lora()
        if self.packing:  # refuse up front a model that cannot take packed rows
            from espo_lightning.policy.packing import prepare_for_packing

            for model, name in ((self.policy, "policy"), (self.reference, "reference model")):
                if model is not None:
                    prepare_for_packing(model, name)
        if empty:
            from espo_lightning.policy.loading import load_into_shards

            for model, path in ((self.policy, self.model_name_or_path), (self.reference, self.reference_path)):
                if model is not None:
                    load_into_shards(model, path, self.trainer.strategy.root_device, self._load_kwargs())

    # ----- LoRA (espo_lightning.policy.lora) ---------------------------------------------------
    def _reference_is_base(self) -> bool:
        """With LoRA, the KL reference is the policy's own base (adapters off) unless
        ``reference_model`` names another checkpoint."""
        return self.lora is not None and self.reference_path == self.model_name_or_path

    def _configure_lora(self) -> None:
        from espo_lightning.policy.lora import AdaptersOff
        from espo_lightning.training.checkpoint_keys import drop_frozen

        if self.loss_fn.needs_reference and self._reference_is_base():
            self.reference = AdaptersOff(self.policy)  # not a submodule: nothing to shard or save
        # Checkpoints hold the adapters only; the frozen base is reloaded from model_name_or_path.
        self.saved_policy_keys = self._saved_policy_keys()
        self.register_state_dict_post_hook(drop_frozen)

    def _saved_policy_keys(self) -> frozenset[str]:
        from espo_lightning.policy.lora import trainable_keys

        return trainable_keys(self.policy, prefix="policy.")

    def configure_optimizers(self):
        self._trained = [p for p in self.policy.parameters() if p.requires_grad]  # fixed from here on
        optimizer = self.optimizer_factory(iter(self._trained))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ----- precision and micro-batches -------------------------------------------------------
    def setup(self, stage: str) -> None:
        # One optimizer step per minibatch, accumulated over micro-batches, needs manual
        # optimization. Lightning refuses trainer.gradient_clip_val under manual optimization when
        # fit starts (before this hook), so the switch happens here and on_before_optimizer_step
        # applies the trainer's clipping setting itself: it keeps its usual meaning in the configs.
        if self._trainer is not None and self.trainer.accumulate_grad_batches != 1:
            raise ConfigError("trainer.accumulate_grad_batches: one optimizer step covers one minibatch "
                              "(data.minibatch_size); to bound memory set model.micro_batch_size or "
                              "model.max_tokens_per_micro_batch instead")
        self.automatic_optimization = False

    def precision_context(self):
        """The precision context ``training_step`` runs in (autocast under bf16-mixed, the default
        dtype under bf16-true), for the passes outside it: old-policy scoring and HF generation."""
        return self.trainer.precision_plugin.train_step_context() if self._trainer is not None else nullcontext()

    def micro_batches(self, batch: RolloutBatch) -> list[torch.Tensor]:
        """Row indices of each micro-batch of ``batch`` (CPU long tensors)."""
        if self.micro_batch_size is None and self.max_tokens_per_micro_batch is None:
            return [torch.arange(len(batch))]  # one pass in row order; no lengths needed
        prompt_lengths = batch.attention_mask[:, : batch.prompt_length].sum(-1)
        completion_lengths = batch.attention_mask[:, batch.prompt_length :].sum(-1)
        return plan_micro_batches(prompt_lengths, completion_lengths, self.micro_batch_size,
                                  self.max_tokens_per_micro_batch, packed=self.packing)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    # ----- rollout scoring (called by the DataModule, no grad; espo_lightning.training.old_policy) ------
    def score_rollout(self, batch: RolloutBatch, minibatches: list[torch.Tensor] | None = None,
                      defer_first: bool = False) -> RolloutBatch:
        """The rollout's old-policy statistics; see ``old_policy.score_rollout`` (``defer_first``)."""
        return score_rollout(self, batch, minibatches, defer_first)

    # ----- training ---------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch | ServedBatch, batch_idx: int) -> dict:
        batch = unwrap(batch)
        self._grad_norm = None  # (norm,) once computed for this step's gradients
        counts = self._global_counts(batch.completion_mask)
        # Token choices over the whole minibatch on every rank (Clip-Cov, KL-Cov, the high-entropy
        # mask: PolicyLoss.prepare_minibatch); they travel row-sliced with each micro-batch.
        batch.group_ids = self.loss_fn.prepare_minibatch(
            old_logprobs=batch.old_logprobs, advantages=batch.advantages, mask=batch.completion_mask,
            entropies=batch.entropies, group_ids=batch.group_ids, step=self.global_step)
        plan = self._equalised(self.micro_batches(batch))
        # DDP and FSDP2 average gradients over ranks; every rank's loss is already divided by the
        # global counts, so the sum over ranks is the loss whose gradient the step should take.
        scale = float(self._world_size())
        logprobs = torch.zeros_like(batch.old_logprobs)  # [B, Lc] detached, for the minibatch's metrics
        loss_sum = torch.zeros((), device=batch.old_logprobs.device)
        fill = is_unscored(batch)
        for k, (rows, padding) in enumerate(plan):
            rows = rows.to(batch.input_ids.device)
            micro = batch.select(rows).trimmed()
            if padding:  # see _equalised: no valid token, zero gradient
                micro.completion_mask = torch.zeros_like(micro.completion_mask)
            logp, entropies = self.scorer.logprobs_with_entropy(self.policy, micro, with_entropy=fill)
            if fill:
                fill_old_policy(self.loss_fn, batch, rows, micro, logp.detach(), entropies, write=not padding)
            loss, micro_metrics = self.loss_fn(
                logprobs=logp, old_logprobs=micro.old_logprobs, advantages=micro.advantages,
                mask=micro.completion_mask, entropies=micro.entropies, ref_logprobs=micro.ref_logprobs,
                group_ids=micro.group_ids, normalizer=counts)
            with self._gradient_sync(k == len(plan) - 1):
                self.manual_backward(loss * scale)
            if not padding:
                logprobs[rows, : logp.shape[1]] = logp.detach()
            loss_sum += loss.detach()
        batch.unscored = None
        # one pass over the minibatch as it is: its loss saw exactly these tensors, so its metrics
        # (they describe the rows given, whatever the normalizer) are the minibatch's
        if is_one_pass(plan, len(batch)) and micro.completion_mask.shape == batch.completion_mask.shape:
            metrics = micro_metrics
        else:
            with torch.no_grad():  # the minibatch's diagnostics, exactly as one pass over it would give
                _, metrics = self.loss_fn(
                    logprobs=logprobs, old_logprobs=batch.old_logprobs, advantages=batch.advantages,
                    mask=batch.completion_mask, entropies=batch.entropies, ref_logprobs=batch.ref_logprobs,
                    group_ids=batch.group_ids)
        self._optimizer_step(stepped=bool(counts.tokens > 0))
        self._log_loss(loss_sum, metrics.get("kl/mean"))
        show_reward(self, batch_idx)
        return {"loss": loss_sum, "metrics": metrics, "batch": batch}

    def _log_loss(self, loss_sum: torch.Tensor, kl: torch.Tensor | None) -> None:
        """``loss/policy`` (the sum of the ranks' shares of the global loss) and ``loss/kl`` (mean over ranks)."""
        if self._trainer is None or not step_is_logged(self.trainer):
            return
        values = torch.stack([loss_sum.detach(), loss_sum.new_zeros(()) if kl is None else kl.detach()])
        if self._world_size() > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="sum")
        loss, kl_sum = values.tolist()
        write_metrics(self.trainer, {"loss/policy": loss} if kl is None else
                      {"loss/policy": loss, "loss/kl": kl_sum / self._world_size()})

    def _global_counts(self, mask: torch.Tensor) -> Normalizer:
        """Responses with a valid token and valid tokens of the minibatch, summed over ranks."""
        local = torch.stack(Normalizer.of(mask))  # [2]
        if self._world_size() > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        return Normalizer(local[0], local[1])

    def _equalised(self, plan: list[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
        """``(rows, padding)`` per pass, padded to the largest number of micro-batches of any rank:
        sharded models run collectives in every forward and backward, so every rank must make the
        same passes (a token budget can cut ranks' minibatches into different numbers). A padding
        pass re-reads row 0 with its mask cleared: it contributes nothing to loss or gradient."""
        passes = [(rows, False) for rows in plan]
        if self._world_size() == 1:
            return passes
        most = int(self.trainer.strategy.reduce(torch.tensor(float(len(plan)), device=self.device), reduce_op="max"))
        return passes + [(torch.zeros(1, dtype=torch.long), True)] * (most - len(plan))

    @contextmanager
    def _gradient_sync(self, sync: bool):
        """Reduce gradients over ranks only on the last micro-batch (``defer_grad_sync``)."""
        if sync or not self.defer_grad_sync or self._world_size() == 1:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.policy, FSDPModule):
            self.policy.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.policy.set_requires_gradient_sync(True)
        else:
            with self.trainer.strategy.block_backward_sync():  # DDP's no_sync
                yield

    def _optimizer_step(self, stepped: bool) -> None:
        """One optimizer (and step-interval scheduler) step, unless no rank had a valid token: then
        the gradient is zero and AdamW would still move on momentum alone."""
        optimizer = self.optimizers()
        if stepped:
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def gradient_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the policy's gradients before clipping, computed at most once per
        optimizer step: gradient clipping and ``GradientUtilizationMonitor`` share it. None when no
        parameter has a gradient."""
        if self._grad_norm is None:
            self._grad_norm = (total_grad_norm(self.trained_parameters()),)
        return self._grad_norm[0]

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer holds (listed once: walking the module tree twice a step cost ~0.3 ms)."""
        return self._trained if self._trained is not None else [p for p in self.policy.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, optimizer) -> None:
        # After the callbacks' hooks (they see the unclipped gradients, as under automatic optimization).
        if self.trainer.gradient_clip_val:
            clip_with_shared_norm(self, optimizer, self.trainer.gradient_clip_val)

    # ----- the training loop's garbage collector and heap ------------------------------------
    def on_train_start(self) -> None:
        # Everything built so far lives as long as the run, and each full collection walks all of it
        # (260 ms on the 2-core CPU machine, every few hundred steps). Frozen, collections see only
        # what the loop allocates. A full collection first would cost as much as it saves.
        gc.collect(1)
        gc.freeze()
        if self.retain_cpu_heap and self.device.type == "cpu":
            retain_freed_heap()  # every backward would otherwise give the heap back (cpu_heap.py)

    def on_train_end(self) -> None:
        gc.unfreeze()  # back to normal collection (notebooks, a validate after fit)

    # ----- validation: the evaluation sets (espo_lightning.evaluation) ------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        self.trainer.datamodule.evaluate(batch)  # a chunk of one set; results stay in its Evaluator

    def on_validation_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        metrics = datamodule.finish_evaluation()  # global: the same on every rank
        # Lightning drops what is logged during the sanity check (the evaluation before the first
        # update) and logs `validate` at step 0: those go straight to the loggers, at the step of
        # the evaluated weights (under `validate`, the checkpoint's).
        direct = self.trainer.sanity_checking or self.trainer.state.fn == "validate"
        for logger in self.loggers if direct and self.trainer.is_global_zero else []:
            logger.log_metrics(metrics, step=datamodule.evaluator.step)
        if self.trainer.sanity_checking:
            return
        headlines = datamodule.evaluator.headlines
        for name, value in metrics.items():  # already global: the max over ranks of equal values is exact
            self.log(name, value, prog_bar=name in headlines, logger=not direct, sync_dist=True, reduce_fx="max")

    # ----- checkpoints and export -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_reference(checkpoint)  # reloaded from model_name_or_path, never saved

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_keys(self, checkpoint)  # fails naming keys missing or extra (checkpoint_keys.py)

    def on_fit_end(self) -> None:
        if self.export_dir:
            from espo_lightning.policy.export import export_policy

            target = Path(self.export_dir)
            if not target.is_absolute() and self.trainer.log_dir:
                target = Path(self.trainer.log_dir) / target
            export_policy(self, str(target), merged=self.export_merged)

