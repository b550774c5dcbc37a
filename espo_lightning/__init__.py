"""espo-lightning: RL fine-tuning of LLMs with verifiable rewards on PyTorch Lightning.

Where things live:
  losses/        policy losses (ESPO, GSPO, GRPO/DAPO, CISPO, GMPO) and KL estimators
  advantages.py  group-normalised advantages;  logprobs.py  chunked log-probs and entropies
  module.py      the LightningModule (policy + reference + loss);  checkpoint_keys.py  what its
                 checkpoints hold;  cpu_heap.py  the heap setting of a CPU training loop
  old_policy.py  the old policy's log-probs, entropies and groups of a rollout (or of its first update)
  scoring.py     forward passes to log-probs (lm_head.py: the fused head);  grad_norm.py  shared norm
  evaluation/    validation sets: greedy accuracy, avg@k, pass@k, eval summaries and samples
  rollout/       the rollout DataModule, typed batches, rollout engines (HF generate, vLLM)
  rewards/       reward functions (math_accuracy, format, exact match)
  data/          prompt sources (JSONL / Parquet / HF datasets folders)
  tasks/         the embedded default task and tiny model
  cli.py         ``python -m espo_lightning fit --config conf/X.yaml``
Diagnostics callbacks live in the top-level ``callbacks`` package.
"""

__version__ = "0.1.0"
