"""espo-lightning: RL fine-tuning of LLMs with verifiable rewards on PyTorch Lightning.

The pipeline, one package a stage (docs/development.md, "Where things go"):
  data/          prompt sources (JSONL / Parquet / HF datasets folders) and prompt encoding
  engines/       rollout engines (HF generate, vLLM), used by the rollout and by evaluation
  rollout/       the rollout DataModule: sampling rounds, rewards, group advantages, typed batches,
                 minibatches, the rollout's part of a checkpoint
  rewards/       reward functions (math_accuracy, format, exact match)
  training/      the LightningModule (policy + reference + loss) and its step: micro-batches, the
                 old policy's scores, the shared gradient norm, step logging, checkpoint keys
  losses/        policy losses (ESPO, GSPO, GRPO/DAPO, CISPO, GMPO) and KL estimators
  policy/        the model: loading without full copies, FSDP2 sharding, attention, the fused LM
                 head, log-probs and entropies, export
  evaluation/    validation sets: greedy accuracy, avg@k, pass@k, eval summaries and samples
  run/           checkpoints and resume, one-line CLI errors, distributed helpers
  compare/       ``python -m espo_lightning.compare``: methods side by side, seeds, report
  tasks/         the embedded default tasks and their tiny models
  cli.py         ``python -m espo_lightning fit --config conf/X.yaml``;  plots.py  run figures
Diagnostics callbacks live in the top-level ``callbacks`` package.
"""

__version__ = "0.1.0"
