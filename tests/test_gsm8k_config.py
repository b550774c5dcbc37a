"""conf/gsm8k.yaml's data section on the real GSM8K test split: the config's own prompt source loads
the file, and the config's reward scores every gold solution as correct."""
from __future__ import annotations

import sys
from pathlib import Path

from espo_lightning.cli import TRAINER_DEFAULTS, ESPOLightningCLI
from espo_lightning.training.module import PolicyModule
from espo_lightning.rollout.datamodule import RolloutDataModule
from espo_lightning.rollout.rewarding import combined_rewards

CONF = Path(__file__).resolve().parents[1] / "conf" / "gsm8k.yaml"


def test_gsm8k_config_loads_real_data_and_scores_gold(gsm8k_path):
    sys.argv = sys.argv[:1]
    cli = ESPOLightningCLI(PolicyModule, RolloutDataModule, trainer_defaults=TRAINER_DEFAULTS,
                           parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False, run=False,
                           args=["--config", str(CONF), "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                                 f"--data.train_data.init_args.path={gsm8k_path}",
                                 f"--data.val_data.init_args.path={gsm8k_path}"])
    dm = cli.datamodule
    dm.check_data()
    rows = dm.train_data.rows()
    assert len(rows) == 1319
    assert rows[0]["prompt"].endswith("put your final answer within \\boxed{}.")
    golds = [r["answer"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    accuracy = dm.accuracy_reward(prompts=[r["prompt"] for r in rows], completions=golds, **columns)
    assert sum(a == 1.0 for a in accuracy) / len(rows) >= 0.999
    combined = combined_rewards(dm.reward_funcs, dm.reward_weights, [r["prompt"] for r in rows], golds, columns)
    assert all(c is not None and c >= 1.0 for c in combined)
    assert len(dm.val_data.rows()) == 500  # the config's limit
