"""Every YAML in conf/ is parsed and instantiated by the real CLI (no weights are loaded: models are
built in configure_model, which only fit/validate call)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from espo_lightning.cli import ESPOLightningCLI, TRAINER_DEFAULTS
from espo_lightning.training.module import PolicyModule
from espo_lightning.rollout.datamodule import RolloutDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"
# GPU configs are instantiated on the CPU here: only the hardware keys are overridden.
CPU_OVERRIDES = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
                 "--trainer.strategy=auto", "--trainer.precision=32-true"]
# Baselines are written to compose on top of the quickstart.
OVERLAYS = {"gspo.yaml", "grpo.yaml", "dapo.yaml", "cispo.yaml", "sapo.yaml", "clip_cov.yaml", "kl_cov.yaml",
            "entropy_mask.yaml", "async_off.yaml"}
# Files of `python -m espo_lightning.compare`, not trainer configs (their methods are built below).
COMPARISONS = {"compare.yaml", "compare_entropy.yaml", "compare_async.yaml"}


def build(args: list[str]) -> ESPOLightningCLI:
    sys.argv = sys.argv[:1]  # LightningCLI warns when both args and pytest's own argv are present
    return ESPOLightningCLI(PolicyModule, RolloutDataModule, trainer_defaults=TRAINER_DEFAULTS,
                            parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False,
                            run=False, args=args)


@pytest.mark.parametrize("name", sorted(p.name for p in CONF.glob("*.yaml") if p.name not in COMPARISONS))
def test_config_instantiates(name, tmp_path):
    configs = ["--config", str(CONF / "quickstart.yaml")] if name in OVERLAYS else []
    configs += ["--config", str(CONF / name)]
    cli = build(configs + CPU_OVERRIDES + [f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model, PolicyModule)
    assert isinstance(cli.datamodule, RolloutDataModule)
    assert cli.model.policy is None  # nothing heavy was loaded
    assert cli.datamodule.num_generations >= 2


def test_baselines_select_their_losses(tmp_path):
    from espo_lightning.losses import GRPOLoss, GSPOLoss

    grpo = build(["--config", str(CONF / "quickstart.yaml"), "--config", str(CONF / "dapo.yaml")])
    assert isinstance(grpo.model.loss_fn, GRPOLoss)
    assert grpo.model.loss_fn.loss_aggregation == "token_mean" and grpo.datamodule.drop_zero_std_groups
    gspo = build(["--config", str(CONF / "quickstart.yaml"), "--config", str(CONF / "gspo.yaml")])
    assert isinstance(gspo.model.loss_fn, GSPOLoss)


def test_every_method_of_the_comparison_instantiates(tmp_path, monkeypatch):
    from espo_lightning.compare.plan import load_plan

    monkeypatch.chdir(CONF.parent)  # the comparison names configs relative to the repository root
    plan = load_plan("conf/compare.yaml")
    losses = {"ESPO": "ESPOLoss", "GSPO": "GSPOLoss", "GRPO": "GRPOLoss", "DAPO": "GRPOLoss", "CISPO": "CISPOLoss"}
    for method, overlays in plan.methods.items():
        configs = [arg for path in plan.base + overlays for arg in ("--config", path)]
        cli = build(configs + plan.overrides + [f"--trainer.default_root_dir={tmp_path}"])
        assert type(cli.model.loss_fn).__name__ == losses[method], method
        assert cli.datamodule.drop_zero_std_groups == (method == "DAPO"), method
        assert type(cli.datamodule.train_data).__name__ == "ChainSource"


def test_every_method_of_the_entropy_comparison_instantiates(tmp_path, monkeypatch):
    """conf/compare_entropy.yaml (issue 31): six methods on the chained-addition task, 3 seeds, each
    overlay selecting its loss with the paper's / verl's defaults."""
    from espo_lightning.compare.plan import load_plan
    from espo_lightning.losses import GRPOLoss

    monkeypatch.chdir(CONF.parent)
    plan = load_plan("conf/compare_entropy.yaml")
    assert plan.seeds == [0, 1, 2]
    losses = {"ESPO": "ESPOLoss", "GSPO": "GSPOLoss", "SAPO": "SAPOLoss", "Clip-Cov": "ClipCovLoss",
              "KL-Cov": "KLCovLoss", "Entropy-mask": "HighEntropyMaskLoss"}
    assert set(plan.methods) == set(losses)
    for method, overlays in plan.methods.items():
        configs = [arg for path in plan.base + overlays for arg in ("--config", path)]
        cli = build(configs + plan.overrides + [f"--trainer.default_root_dir={tmp_path}"])
        loss = cli.model.loss_fn
        assert type(loss).__name__ == losses[method], method
        assert type(cli.datamodule.train_data).__name__ == "ChainSource"
        assert not cli.datamodule.drop_zero_std_groups, method
        if method == "SAPO":
            assert (loss.tau_pos, loss.tau_neg) == (1.0, 1.05)
        if method == "Clip-Cov":
            assert (loss.clip_ratio, loss.cov_lb, loss.cov_ub, loss.selection) == (2e-4, 1.0, 5.0, "minibatch")
        if method == "KL-Cov":
            assert (loss.kl_cov_ratio, loss.kl_coef, loss.ppo_clip) == (2e-4, 1.0, False)
        if method == "Entropy-mask":
            assert loss.top_entropy_quantile == 0.2 and isinstance(loss.loss, GRPOLoss)
            assert (loss.loss.epsilon_high, loss.loss.loss_aggregation) == (0.28, "token_mean")
            assert not loss.prepares_per_response  # the threshold needs every row before the step


def test_paper_config_values():
    """conf/espo_qwen3_math.yaml carries the paper's setting (checked via --print_config's parse)."""
    cli = build(["--config", str(CONF / "espo_qwen3_math.yaml")] + CPU_OVERRIDES)
    cfg = cli.config
    assert cfg.model.model_name_or_path.startswith("Qwen/Qwen3-")
    assert cfg.data.num_generations == 8 and cfg.data.prompts_per_rollout == 128
    assert cfg.data.max_new_tokens == 16384 and cfg.data.temperature == 1.0
    assert cfg.model.optimizer.init_args.lr == 1e-6
    assert cfg.model.loss.init_args.alpha == 0.02 and cfg.model.loss.init_args.high_entropy_fraction == 0.2
    assert cfg.data.engine.class_path.endswith("VLLMEngine")
    # evaluated as the paper reports: MATH500 greedy, avg@32 on AIME 2024/2025 and HMMT, 16k tokens
    sets = cli.datamodule.evaluator.specs
    assert list(sets) == ["math500", "aime24", "aime25", "hmmt"] and sets["math500"].greedy
    assert all(sets[n].k == 32 and sets[n].temperature == 1.0 and not sets[n].greedy for n in ("aime24", "aime25", "hmmt"))
    assert all(s.max_new_tokens == 16384 for s in sets.values())


def test_both_sides_of_the_async_comparison_instantiate(tmp_path, monkeypatch):
    """conf/compare_async.yaml (issue 30): ESPO on the vLLM server with max_staleness 1 beside the
    same with max_staleness 0 (conf/async_off.yaml), 3 seeds, the synchronous side the reference."""
    from espo_lightning.compare.plan import load_plan

    monkeypatch.chdir(CONF.parent)
    plan = load_plan("conf/compare_async.yaml")
    assert plan.seeds == [0, 1, 2] and plan.reference_method == "ESPO-sync" and not plan.paper_claims
    staleness = {"ESPO-sync": 0, "ESPO-async": 1}
    assert set(plan.methods) == set(staleness)
    for method, overlays in plan.methods.items():
        configs = [arg for path in plan.base + overlays for arg in ("--config", path)]
        cli = build(configs + plan.overrides + [f"--trainer.default_root_dir={tmp_path}"])
        assert type(cli.model.loss_fn).__name__ == "ESPOLoss", method
        assert type(cli.datamodule.engine).__name__ == "VLLMServerEngine", method
        assert cli.datamodule.max_staleness == staleness[method], method
