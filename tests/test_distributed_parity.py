"""Scale-out parity: two ranks (FSDP2 through Lightning's ``ModelParallelStrategy``, or DDP) take the
same optimizer steps as one process that holds the whole global batch; and ``conf/quickstart_fsdp.yaml``
runs end to end on 2 CPU processes, checkpoints sharded, resumes and exports one loadable HF folder.

What "the same global batch" means: every rank divides its loss by the *global* counts of the
minibatch (responses with a valid token, valid tokens: one small ``all_reduce`` per step) and scales
it by the world size, so the ranks' averaged gradients are the gradient of the single-process loss
over the whole batch, for the response means (ESPO, GRPO, GSPO, GMPO) and the token means (DAPO's
``loss_aggregation: token_mean``, CISPO) alike, whatever the ranks' token counts (the test data
gives the two ranks different counts on purpose). Each rank also cuts its share into micro-batches
(a fixed size, or a token budget that gives the ranks different numbers of passes), which must not
move the result either.

The multi-rank tests launch real processes (Lightning's own launcher, gloo on CPU) by running this
file as a script, train the real tiny addition model with the real ``PolicyModule`` and ``ESPOLoss``
for two steps, and compare exported weights. SGD (not Adam) makes the comparison sharp: Adam's first
step is ``lr * sign(g)`` almost everywhere and would hide a gradient that is off by a factor. The
second step clips the gradient norm with Lightning's ``gradient_clip_val`` far below the gradient's
norm, so its update has norm ``lr * clip`` exactly when the norm is the global one over all shards.
The FSDP2 run has gradient checkpointing on (it composes with the per-block sharding), and every
multi-rank run also checks that the evaluation's ``val/accuracy`` is gathered over ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LR = 0.5  # SGD; large so that a wrong gradient moves weights far beyond the 1e-5 tolerance
CLIP = 1e-3  # gradient-norm clip of step 2, far below the gradient norm
TOL = 1e-5
PROMPTS, G = 8, 4  # 32 responses: 16 per rank


# ----- the shared global batch -------------------------------------------------------------------
def make_global_batch(model_dir: str, path: Path) -> None:
    """A scored rollout of the tiny model, built once and saved: prompt groups of G responses with
    different completion lengths (1 to 5 tokens, EOS or truncated), old log-probs and entropies from
    the model itself (perturbed on some responses so that ESPO's clip binds on part of the batch),
    group-normalised advantages and ESPO's entropy groups."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_lightning.rollout.advantages import group_advantages
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.rollout.tensors import build_rollout_batch
    from espo_lightning.policy.scoring import sequence_logprobs_and_entropy

    gen = torch.Generator().manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    digits = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    prompts, completions = [], []
    for p in range(PROMPTS):
        a, b = 10 + 7 * p, 23 + 5 * p
        ids = tok.encode(f"{a}+{b}=")
        for j in range(G):
            n = 1 + (p + j) % 5
            body = [digits[int(torch.randint(10, (1,), generator=gen))] for _ in range(n)]
            if (p + j) % 3:  # ends with EOS; the others are truncated
                body[-1] = tok.eos_token_id
            prompts.append(ids)
            completions.append(body)
    rewards = torch.rand(len(completions), generator=gen).round()
    batch = build_rollout_batch(prompt_ids=prompts, completion_ids=completions, pad_id=tok.pad_token_id,
                                advantages=group_advantages(rewards, G), rewards=rewards,
                                engine_logprobs=None, temperature=1.0)
    lc = batch.completion_mask.shape[1]
    old, ent = sequence_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, lc, 1.0, 4096, 64)
    shift = 0.05 * torch.randn(old.shape, generator=gen) * (torch.rand(len(batch), 1, generator=gen) < 0.5)
    batch.old_logprobs = torch.where(batch.completion_mask, old + shift, 0.0)
    batch.entropies = torch.where(batch.completion_mask, ent, 0.0)
    loss = ESPOLoss()
    loss.set_vocab_size(model.config.vocab_size)
    batch.group_ids = loss.prepare(batch.entropies, batch.completion_mask)
    assert bool(batch.completion_mask.any(dim=1).all())  # every response counts: exact parity
    torch.save(batch, path)


# ----- the worker (this file run as a script; Lightning launches the other rank) -----------------
def _losses():
    from espo_lightning.losses import CISPOLoss, ESPOLoss, GRPOLoss, HighEntropyMaskLoss, KLCovLoss

    return {
        "espo": ESPOLoss,
        "dapo": lambda: GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean"),
        "cispo": lambda: CISPOLoss(epsilon_low=0.02, epsilon_high=0.02),
        # The token sets these two choose come from the whole minibatch (PolicyLoss.prepare_minibatch in
        # training_step): a per-rank or per-micro-batch choice would give a different step.
        "kl_cov": lambda: KLCovLoss(kl_cov_ratio=0.2),
        "entropy_mask": lambda: HighEntropyMaskLoss(GRPOLoss(loss_aggregation="token_mean"), top_entropy_quantile=0.3),
    }


def worker(strategy: str, model_dir: str, batch_path: str, out_dir: str, options: str = "{}") -> None:
    """Two optimizer steps on this rank's share of the global batch (rows ``rank::world``); step 1
    unclipped, step 2 clipped to ``CLIP``. Writes the full weights after step 1 and exports the
    policy (``export_dir``) after step 2. ``options`` (JSON): ``loss`` (a key of ``_losses()``) and the
    module's micro-batch settings."""
    import lightning as L
    from torch.utils.data import DataLoader

    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rollout.loaders import Items
    from espo_lightning.run.distributed import shutdown
    from espo_lightning.policy.sharding import full_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    class Shard(L.LightningDataModule):
        def train_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            batch = torch.load(batch_path, weights_only=False)
            mine = batch.select(torch.arange(rank, len(batch), world)).trimmed()
            return DataLoader(Items([mine, mine]), batch_size=None)

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            trainer.gradient_clip_val = CLIP if batch_idx == 1 else 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                state = full_state_dict(pl_module.policy)  # collective under FSDP2
                if trainer.is_global_zero:
                    torch.save(state, out / "step1.pt")

    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs = {"devices": 2, "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}
    elif strategy == "ddp":
        kwargs = {"devices": 2, "strategy": "ddp"}
    else:
        kwargs = {"devices": 1}
    # The FSDP2 run also recomputes activations (gradient checkpointing inside each sharded block):
    # recomputation is exact in float32, so it must not move the result either.
    opts = json.loads(options)
    loss = _losses()[opts.pop("loss", "espo")]()
    module = PolicyModule(model_dir, loss=loss, optimizer=lambda params: torch.optim.SGD(params, lr=LR),
                          gradient_checkpointing=strategy == "fsdp", export_dir=str(out / "policy"), **opts)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, precision="32-true", gradient_clip_val=CLIP,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Steps()], **kwargs)
    trainer.fit(module, datamodule=Shard())
    # The evaluation's metric over problems split unevenly across ranks, the padding weighted 0 as
    # the evaluation pads them: rank 0 holds one correct problem, rank 1 two wrong ones and one
    # padding repeat. Global: 1/3 (a mean of rank means would be 1/2).
    from espo_lightning.evaluation import ProblemResult, resolve_sets, set_metrics
    from espo_lightning.evaluation.metrics import gather_results
    from espo_lightning.tasks.addition import AdditionSource

    def problem(index: int, correct: int, weight: float = 1.0) -> ProblemResult:
        return ProblemResult("val", index, weight, 1, correct, 2, 0)

    if trainer.world_size == 1:
        mine = [problem(0, 1), problem(1, 0), problem(2, 0)]
    else:
        mine = [problem(0, 1)] if trainer.global_rank == 0 else [problem(1, 0), problem(2, 0), problem(0, 1, 0.0)]
    spec = resolve_sets(AdditionSource(3), temperature=1.0, top_p=1.0, max_new_tokens=4)[0]
    accuracy = set_metrics(spec, gather_results(mine))["val/accuracy"]
    if trainer.is_global_zero:
        assert trainer.global_step == 2, trainer.global_step
        (out / "done.json").write_text(json.dumps({"world_size": trainer.world_size, "val_accuracy": accuracy,
                                                   "strategy": type(trainer.strategy).__name__}))
    shutdown()


def _clean_env() -> dict[str, str]:
    """The caller's environment without a distributed job's variables (pytest may run inside one)."""
    drop = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
            "GROUP_RANK", "SLURM_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(strategy: str, model_dir: str, batch_path: Path, out: Path, **options) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), strategy, model_dir, str(batch_path), str(out),
                           json.dumps(options)],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{strategy} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (out / "done.json").exists()
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Loads an exported folder the way users do (transformers), unique parameters by name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _norm_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def _step1(out: Path, names: set[str]) -> dict[str, torch.Tensor]:
    state = torch.load(out / "step1.pt", weights_only=True)
    return {k: v for k, v in state.items() if k in names}


@pytest.fixture(scope="module")
def parity_runs(tiny_model_dir, tmp_path_factory):
    """Initial weights, and the single-process run every multi-rank run is compared with."""
    root = tmp_path_factory.mktemp("parity")
    batch_path = root / "batch.pt"
    make_global_batch(tiny_model_dir, batch_path)
    batch = torch.load(batch_path, weights_only=False)
    tokens = [int(batch.completion_mask[rank::2].sum()) for rank in (0, 1)]
    assert tokens[0] != tokens[1], tokens  # the token means are only exact with the global count
    return {"root": root, "batch": batch_path, "model": tiny_model_dir, "initial": _weights(Path(tiny_model_dir)),
            "single": {}}


def _single(runs, loss: str) -> Path:
    """The reference: one process, the whole batch in one pass per step."""
    if loss not in runs["single"]:
        runs["single"][loss] = run_worker("single", runs["model"], runs["batch"], runs["root"] / f"single-{loss}",
                                          loss=loss)
    return runs["single"][loss]


def _check_parity(runs, strategy: str, loss: str = "espo", **micro) -> None:
    out = run_worker(strategy, runs["model"], runs["batch"], runs["root"] / f"{strategy}-{loss}", loss=loss, **micro)
    if strategy != "single":
        done = json.loads((out / "done.json").read_text())
        assert done["world_size"] == 2
        assert done["val_accuracy"] == pytest.approx(1 / 3)  # synchronised over ranks, padding excluded
    initial, single_dir = runs["initial"], _single(runs, loss)
    names = set(initial)
    one_1, two_1 = _step1(single_dir, names), _step1(out, names)
    one_2, two_2 = _weights(single_dir / "policy"), _weights(out / "policy")

    # The steps are real: SGD moved the weights far beyond the tolerance.
    assert _max_diff(one_1, initial) > 1e3 * TOL
    # Step 1 (no clipping): same gradient as the full batch in one process.
    assert _max_diff(two_1, one_1) < TOL
    # Step 2 (clipped by Lightning's gradient_clip_val): the update has norm lr * clip, so the norm
    # was taken over all parameters of all ranks (per-shard norms would give sqrt(2) times that).
    assert _norm_diff(one_2, one_1) == pytest.approx(LR * CLIP, rel=1e-3)
    assert _norm_diff(two_2, two_1) == pytest.approx(LR * CLIP, rel=1e-3)
    assert _max_diff(two_2, one_2) < TOL


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_match_one_process(parity_runs):
    _check_parity(parity_runs, "fsdp")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_reduce_scatter_every_micro_batch(parity_runs):
    """``defer_grad_sync: false`` (the FSDP2 configs' setting): a reduce-scatter after every
    micro-batch, with a token budget that gives the ranks different numbers of passes."""
    _check_parity(parity_runs, "fsdp", max_tokens_per_micro_batch=30, defer_grad_sync=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_ranks_match_one_process(parity_runs):
    _check_parity(parity_runs, "ddp")


@pytest.mark.slow
def test_micro_batches_in_one_process_match_one_pass(parity_runs):
    _check_parity(parity_runs, "single", micro_batch_size=3)


@pytest.mark.slow
@pytest.mark.distributed
def test_dapo_token_mean_on_two_ranks_with_unequal_tokens_and_micro_batches(parity_runs):
    """DDP with a token budget: the ranks hold different token counts and cut different numbers of
    micro-batches, and the step is still the single process's global token mean."""
    _check_parity(parity_runs, "ddp", loss="dapo", max_tokens_per_micro_batch=30)


@pytest.mark.slow
@pytest.mark.distributed
def test_cispo_token_mean_under_fsdp2_with_micro_batches(parity_runs):
    _check_parity(parity_runs, "fsdp", loss="cispo", micro_batch_size=5)


@pytest.mark.slow
@pytest.mark.distributed
def test_kl_cov_selection_over_the_minibatch_under_fsdp2_with_micro_batches(parity_runs):
    """KL-Cov's top-covariance tokens are chosen over both ranks' rows through the real training_step
    (issue 31 item 3), so FSDP2 with micro-batches of 5 rows takes the single process's two steps."""
    _check_parity(parity_runs, "fsdp", loss="kl_cov", micro_batch_size=5)


@pytest.mark.slow
@pytest.mark.distributed
def test_entropy_mask_over_the_minibatch_on_two_ranks_with_a_token_budget(parity_runs):
    """The high-entropy mask's quantile is taken over both ranks' tokens (DDP, unequal token counts,
    a 30-token micro-batch budget), so the step equals the single process's."""
    _check_parity(parity_runs, "ddp", loss="entropy_mask", max_tokens_per_micro_batch=30)


# ----- conf/quickstart_fsdp.yaml end to end: sharded checkpoints, resume, export -----------------
# Small sizes on top of the real config (the full run is `python -m espo_lightning fit --config
# conf/quickstart_fsdp.yaml`); a small KL penalty also exercises the sharded frozen reference.
E2E_OVERLAY = """\
trainer:
  check_val_every_n_epoch: 1
  callbacks:
    - callbacks.ClipFractionMonitor
    - callbacks.EntropyGroupMonitor
    - callbacks.GradientUtilizationMonitor
    - callbacks.RolloutMonitor
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_top_k: -1            # one sharded checkpoint per epoch
model:
  model_builder: null
  loss:
    init_args:
      beta: 0.01
data:
  reward_funcs:                   # the barely trained model is never right: reward a first digit 1,
    - class_path: espo_lightning.rewards.RegexFormatReward  # so that groups have reward variance
      init_args:
        pattern: "^1"
  accuracy_reward: espo_lightning.rewards.exact_match
  prompts_per_rollout: 8
  num_generations: 4
  minibatch_size: 8
  val_data:
    init_args:
      num_problems: 21            # odd: rank 1 gets a zero-weight padding row
  val_batch_size: 4
"""


def _fit(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "espo_lightning", "fit", *args], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _checkpoint_policy(ckpt: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a sharded (DCP) checkpoint, gathered into one file offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = ckpt.parent / (ckpt.name + ".pt")
    dcp_to_torch_save(ckpt, target)
    state = torch.load(target, weights_only=False)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_quickstart_fsdp_runs_checkpoints_resumes_and_exports(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overlay = tmp_path / "small.yaml"
    overlay.write_text(E2E_OVERLAY)
    base = ["--config", str(REPO / "conf" / "quickstart_fsdp.yaml"), "--config", str(overlay),
            f"--model.model_name_or_path={tiny_model_dir}", f"--trainer.default_root_dir={tmp_path / 'runs'}"]

    # Two epochs on 2 processes (FSDP2, gloo): rollouts with sharded generation, training, validation.
    _fit(base + ["--trainer.max_epochs=2"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    ckpts = run / "checkpoints"
    first, last = ckpts / "epoch=0-step=2.ckpt", ckpts / "epoch=1-step=4.ckpt"
    for ckpt in (first, last):  # sharded: a folder with one file per rank plus Lightning's metadata
        assert ckpt.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in ckpt.iterdir()}
    scalars = _scalars(run)
    assert [step for step, _ in scalars["val/accuracy"]] == [0, 1, 3]  # before training, then each epoch
    assert len(scalars["loss/policy"]) == 4
    for name in ("reward/mean", "clip/total_epoch", "grad_util/token_epoch", "entropy/mean_epoch"):
        assert name in scalars, name  # the diagnostics callbacks run (and reduce) under FSDP2

    # The exported folder is one ordinary HF checkpoint that transformers loads, equal to the
    # trained weights in the last sharded checkpoint, and different from the starting point.
    exported = AutoModelForCausalLM.from_pretrained(run / "policy", dtype=torch.float32)
    AutoTokenizer.from_pretrained(run / "policy")
    trained = _checkpoint_policy(last)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    weights = exported.state_dict()
    assert set(weights) <= set(trained)
    assert all(torch.equal(weights[k], trained[k]) for k in weights)
    assert max(float((weights[k] - start[k]).abs().max()) for k in weights) > 1e-4

    # Resuming the first epoch's sharded checkpoint (weights, optimizer state, loop counters)
    # reproduces the uninterrupted run's second epoch.
    _fit(base + ["--trainer.max_epochs=2", f"--ckpt_path={first}"])
    resumed = tmp_path / "runs" / "lightning_logs" / "version_1"
    assert (resumed / "checkpoints" / "epoch=1-step=4.ckpt").is_dir()
    again = AutoModelForCausalLM.from_pretrained(resumed / "policy", dtype=torch.float32).state_dict()
    assert max(float((again[k] - weights[k]).abs().max()) for k in weights) < 1e-6


if __name__ == "__main__":
    worker(*sys.argv[1:6])
