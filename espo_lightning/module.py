"""The LightningModule: a policy, an optional frozen reference model, and a policy loss.

``training_step`` takes one typed rollout minibatch (``RolloutBatch``) and returns the loss plus the
loss's diagnostics; callbacks in ``callbacks/`` read those from the step output (see
``callbacks/base.py`` for the contract)."""
from __future__ import annotations

from typing import Callable, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from espo_lightning.errors import ConfigError
from espo_lightning.losses import ESPOLoss, PolicyLoss
from espo_lightning.rollout.batch import RolloutBatch
from espo_lightning.scoring import sequence_logprobs, sequence_logprobs_and_entropy

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
        attn_implementation: Passed to ``from_pretrained`` (e.g. "sdpa", "flash_attention_2").
        trust_remote_code: Passed to ``from_pretrained``.
        logprob_chunk_size: Rows of the [tokens, V] logits processed at a time when computing log-probs.
        scoring_batch_size: Sequences per no-grad forward pass when scoring a rollout.
        export_dir: If set, the trained policy and tokenizer are saved there (``save_pretrained``)
            when fit ends; transformers and vLLM load the folder directly. A relative path is taken
            inside the run's log folder (next to its checkpoints and config.yaml).
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
        logprob_chunk_size: int = 4096,
        scoring_batch_size: int = 64,
        export_dir: str | None = None,
    ):
        super().__init__()
        for key, value in (("logprob_chunk_size", logprob_chunk_size), ("scoring_batch_size", scoring_batch_size)):
            if value < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {value}")
        self.model_name_or_path = model_name_or_path
        self.loss_fn = loss if loss is not None else ESPOLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.model_builder = model_builder
        self.reference_path = reference_model or model_name_or_path
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.logprob_chunk_size = logprob_chunk_size
        self.scoring_batch_size = scoring_batch_size
        self.export_dir = export_dir
        self.policy = None
        self.reference = None
        self.tokenizer = None
        self.val_accuracy = MeanMetric()
        self.strict_loading = False  # the frozen reference is not checkpointed (it is reloadable)
        _check_optimizer(optimizer)

    # ----- models -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.model_builder is not None:  # local rank 0 only; Lightning barriers afterwards
            self.model_builder(self.model_name_or_path)

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": DTYPES[self.dtype_name], "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as err:
            raise ConfigError(f"model.model_name_or_path: cannot load a causal LM from {path!r} ({err})") from err

    def configure_model(self) -> None:
        """Builds the models here so sharding (FSDP2 ``fully_shard``) is a strategy choice."""
        if self.policy is not None:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.policy = self._load(self.model_name_or_path).train()  # from_pretrained returns eval mode
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(self.loss_fn, "vocab_size", 1) is None:
            self.loss_fn.set_vocab_size(self.policy.config.vocab_size)
        if self.loss_fn.needs_reference:
            self.reference = self._load(self.reference_path).eval().requires_grad_(False)
        from espo_lightning.sharding import shard_models

        shard_models(self)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(p for p in self.policy.parameters() if p.requires_grad)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ----- rollout scoring (called by the DataModule, no grad) ---------------------------------
    @torch.no_grad()
    def score_rollout(self, batch: RolloutBatch) -> RolloutBatch:
        """Fill in old log-probs, entropies, reference log-probs and ESPO's entropy groups."""
        lc = batch.completion_mask.shape[1]
        was_training = self.policy.training
        self.policy.eval()
        try:
            batch.old_logprobs, batch.entropies = sequence_logprobs_and_entropy(
                self.policy, batch.input_ids, batch.attention_mask, lc, batch.temperature,
                self.logprob_chunk_size, self.scoring_batch_size)
            if self.reference is not None:
                batch.ref_logprobs, _ = sequence_logprobs_and_entropy(
                    self.reference, batch.input_ids, batch.attention_mask, lc, batch.temperature,
                    self.logprob_chunk_size, self.scoring_batch_size)
        finally:
            self.policy.train(was_training)
        batch.group_ids = self.loss_fn.prepare(batch.entropies, batch.completion_mask)
        return batch

    # ----- training ---------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict:
        lc = batch.completion_mask.shape[1]
        logprobs = sequence_logprobs(self.policy, batch.input_ids, batch.attention_mask, lc,
                                     batch.temperature, self.logprob_chunk_size)
        loss, metrics = self.loss_fn(
            logprobs=logprobs, old_logprobs=batch.old_logprobs, advantages=batch.advantages,
            mask=batch.completion_mask, entropies=batch.entropies, ref_logprobs=batch.ref_logprobs,
            group_ids=batch.group_ids)
        # Mean over ranks (a no-op on one): with equal minibatches per rank, the loss that the
        # averaged gradients descend, not rank 0's share of it.
        self.log("loss/policy", loss.detach(), prog_bar=False, batch_size=len(batch), sync_dist=True)
        if "kl/mean" in metrics:
            self.log("loss/kl", metrics["kl/mean"], batch_size=len(batch), sync_dist=True)
        rollout = getattr(self.trainer.datamodule, "last_rollout", None) if self._trainer else None
        if rollout is not None and batch_idx == 0:
            self.log("reward", rollout.reward_mean, prog_bar=True, logger=False, batch_size=1)
        return {"loss": loss, "metrics": metrics, "batch": batch}

    # ----- validation: greedy accuracy on held-out prompts -------------------------------------
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        correct, weight = self.trainer.datamodule.evaluate(batch)  # [n] each
        self.val_accuracy.update(correct, weight)

    def on_validation_epoch_end(self) -> None:
        accuracy = self.val_accuracy.compute()  # synchronised across ranks by torchmetrics
        self.val_accuracy.reset()
        if self.trainer.sanity_checking:
            # Lightning drops what is logged during the sanity check; this pass is the evaluation
            # before the first update, so it goes straight to the logger at step 0.
            if self.logger is not None and self.trainer.is_global_zero:
                self.logger.log_metrics({"val/accuracy": accuracy.item()}, step=self.global_step)
        else:
            self.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True)  # already global: a no-op mean

    # ----- checkpoints and export -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]

    def on_fit_end(self) -> None:
        if self.export_dir:
            from espo_lightning.export import export_policy

            from pathlib import Path

            target = Path(self.export_dir)
            if not target.is_absolute() and self.trainer.log_dir:
                target = Path(self.trainer.log_dir) / target
            export_policy(self, str(target))


def _check_optimizer(factory) -> None:
    """Build the optimizer once on a dummy parameter so a bad value (a negative lr, ...) fails at
    start-up with the optimizer's own message instead of after the first rollout."""
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        hint = " (model.optimizer.init_args.lr must be >= 0)" if "learning rate" in str(err) else ""
        raise ConfigError(f"model.optimizer: {err}{hint}") from err
