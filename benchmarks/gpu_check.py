"""The one-GPU check: a Qwen3-1.7B-shaped model with random weights, `fit` for 2 rollouts on the
real pieces (``PolicyModule``, ``RolloutDataModule`` with the HF engine, Lightning's ``Trainer``,
the diagnostics callbacks) under ``bf16-mixed`` with the fused LM head, then a table.

    python benchmarks/gpu_check.py            # one CUDA device (make gpu-check)
    python benchmarks/gpu_check.py --tiny     # the same on the CPU in seconds (part of make test)

Needs this package and its own dependencies, no vLLM and no model hub. The model is built in memory
from ``transformers.Qwen3Config`` (hidden 2,048, 28 layers, 16 heads, 8 KV heads, head_dim 128, MLP
6,144, tied embeddings, V = 151,936) and saved to a temporary folder with a word-level tokenizer
over all 151,936 ids (``w0`` .. ``w151935``, as ``espo_lightning.tasks.wide_vocab`` builds it), so
whatever the random model samples decodes. Prompts are ``WideVocabSource``'s, the reward
``parity_reward`` (it varies within every group of random completions, so advantages and gradients
are not zero). ``--tiny``: 2 layers, hidden 64, still V = 151,936.

Each rollout is one minibatch trained twice (``ppo_epochs: 2``): the rollout is scored by the
scoring pass up front and the first update is on-policy, so its log-probs must equal the old
log-probs bit for bit (docs/memory.md, "Memory of a training step": old-policy scoring runs under the step's
precision context, in train mode, on the micro-batches the step cuts).

Lines of the table (``must``: the script exits 1 when one fails; 2 without CUDA unless ``--tiny``):

- fused LM head: must be on for the model (a fallback to the logits path fails here).
- on-policy ratio: max |exp(logp - old_logp) - 1| over the valid tokens of each rollout's first
  (on-policy) minibatch; must be exactly 0, i.e. the ratio is exactly 1.
- clip/total on that minibatch (the loss's own metric); must be exactly 0.
- training-step peak memory at 4k, 8k and 16k tokens per micro-batch (``--tiny``: 64, 128, 256):
  after the fit, one real ``training_step`` (forward, backward, AdamW step) on a scored batch of
  rows of 1,024 tokens (16 prompt + 1,008 completion; ``--tiny``: 16 + 48) that is one micro-batch,
  with the fit's Adam moments in place: ``torch.cuda.max_memory_allocated`` over that step, beside
  the memory model of docs/memory.md for one device (``memory_model``). On the CPU: not measured. AdamW is
  ``fused=True`` on CUDA (the foreach default allocates a temporary of the weights' size in its step).
- generation tokens/s: the HF engine's sampled tokens per second of the second rollout's generation.
- training tokens/s: completion tokens per second of the second rollout's training steps, and
  padded tokens per second of each memory row's step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 151_936
GIB = 2**30


@dataclass(frozen=True)
class Setting:
    """What one flavour of the check runs."""

    name: str
    shape: dict  # Qwen3Config keys
    prompts: int  # prompts per rollout
    generations: int  # G
    max_new_tokens: int
    fit_micro_tokens: int  # model.max_tokens_per_micro_batch during the fit
    row_prompt: int  # memory rows: prompt tokens
    row_width: int  # memory rows: prompt + completion tokens
    tokens: tuple[int, ...]  # tokens per micro-batch of the memory rows
    max_positions: int


FULL = Setting(
    name="Qwen3-1.7B shape",
    shape=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
               head_dim=128, intermediate_size=6144),
    prompts=16, generations=8, max_new_tokens=256, fit_micro_tokens=8192,
    row_prompt=16, row_width=1024, tokens=(4096, 8192, 16384), max_positions=40_960)

TINY = Setting(
    name="tiny Qwen3 shape",
    shape=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128),
    prompts=4, generations=4, max_new_tokens=8, fit_micro_tokens=128,
    row_prompt=16, row_width=64, tokens=(64, 128, 256), max_positions=1024)


# ----- the model ------------------------------------------------------------------------------
def build_model(path: Path, setting: Setting, device, seed: int = 0, attention_dropout: float = 0.0) -> Path:
    """A random Qwen3-shaped model (bf16 on disk) and a word-level tokenizer over all V ids."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    core = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", eos_token="w1", unk_token="w2",
                                        padding_side="left")
    config = Qwen3Config(vocab_size=VOCAB, **setting.shape, tie_word_embeddings=True,
                         max_position_embeddings=setting.max_positions, rms_norm_eps=1e-6,
                         attention_dropout=attention_dropout, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):  # random init where it is fast (the GPU for the full shape)
        model = Qwen3ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)  # the trainer loads fp32 master weights from it
    tokenizer.save_pretrained(path)
    del model
    return path


# ----- the memory model of docs/memory.md ----------------------------------------------------------------
def memory_model(params: int, block_params: int, tokens: int, hidden: int, layers: int, intermediate: int,
                 vocab: int, chunk: int, positions: int | None = None) -> dict[str, int]:
    """Bytes of a training step's peak on one device, row by row as docs/memory.md "What scales with what"
    lists them (R = 1, gradient checkpointing, fused head, bf16-mixed with fp32 master weights).
    The bf16 weights are docs/memory.md's "2 x block + root": Lightning's autocast runs with its cast
    cache off, so a weight's bf16 copy lives while its op's backward needs it, which under
    checkpointing is one block's recompute (two blocks' worth counted) and the root. A sum of parts
    that do not all peak at the same moment, so the measured peak should lie at or below it.
    ``positions``: the valid completion positions of the micro-batch, which bound the head's chunk
    (the rows of docs/memory.md assume C <= N)."""
    chunk = min(chunk, positions) if positions is not None else chunk
    root = params - layers * block_params  # embeddings (= the tied head), final norm
    return {
        "fp32 weights, gradients, AdamW moments: 16 P": 16 * params,
        "bf16 weights: 2 blocks in flight + root": 2 * (2 * block_params + root),
        "checkpointed block inputs: 2 N H L": 2 * tokens * hidden * layers,
        "one block's recompute: 8 N I": 8 * tokens * intermediate,
        "fused head chunk: 10 C V": 10 * chunk * vocab,
        "fused head backward: 6 V H": 6 * vocab * hidden,
    }


# ----- what the fit records ---------------------------------------------------------------------
def recording_loss():
    """ESPO (the default loss) that keeps its inputs while ``record`` is a list."""
    from espo_lightning.losses import ESPOLoss

    class RecordingESPOLoss(ESPOLoss):
        record: list | None = None

        def forward(self, **kwargs):
            if self.record is not None:
                self.record.append((kwargs["logprobs"].detach(), kwargs["old_logprobs"].detach(),
                                    kwargs["mask"].detach()))
            return super().forward(**kwargs)

    return RecordingESPOLoss()


@dataclass
class Measured:
    ratio_dev: list[float] = field(default_factory=list)  # per rollout: max |ratio - 1| of the first minibatch
    logp_dev: list[float] = field(default_factory=list)  # per rollout: max |logp - old_logp| there
    clip_total: list[float] = field(default_factory=list)  # per rollout: clip/total of that step
    step_seconds: dict[int, list[float]] = field(default_factory=dict)  # epoch -> training step times
    step_tokens: dict[int, list[float]] = field(default_factory=dict)  # epoch -> completion tokens per step
    generation: dict[int, tuple[int, float]] = field(default_factory=dict)  # epoch -> (tokens, seconds)
    fused: bool | None = None
    memory: list[dict] = field(default_factory=list)  # one per memory row


def _sync(module) -> None:
    import torch

    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def probe_callback(setting: Setting, measured: Measured):
    import lightning as L

    class Probe(L.Callback):
        """Times and checks the fit's steps; after the fit, runs the memory rows (``on_train_end``:
        the module, its optimizer and the Adam moments are still on the device)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # the rollout's first, on-policy update
                pl_module.loss_fn.record = []
            _sync(pl_module)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(pl_module)
            epoch = trainer.current_epoch
            measured.step_seconds.setdefault(epoch, []).append(time.perf_counter() - self._t0)
            metrics = outputs["metrics"]
            measured.step_tokens.setdefault(epoch, []).append(float(metrics["count/tokens"]))
            if batch_idx != 0:
                return
            record, pl_module.loss_fn.record = pl_module.loss_fn.record, None
            ratio = logp = 0.0
            for lp, old, mask in record:
                diff = (lp.double() - old.double())[mask]
                if diff.numel():
                    ratio = max(ratio, float((diff.exp() - 1).abs().max()))
                    logp = max(logp, float(diff.abs().max()))
            if not record:
                ratio = logp = math.nan  # the loss never saw the step: fails the check
            measured.ratio_dev.append(ratio)
            measured.logp_dev.append(logp)
            measured.clip_total.append(float(metrics["clip/total"]))

        def on_train_epoch_end(self, trainer, pl_module):
            stats = trainer.datamodule.last_rollout
            measured.generation[trainer.current_epoch] = (stats.generated_tokens, stats.generation_time_s)

        def on_train_end(self, trainer, pl_module):
            from espo_lightning.policy.lm_head import fusion_blocker

            measured.fused = fusion_blocker(pl_module.policy) is None
            for tokens in setting.tokens:
                measured.memory.append(memory_row(pl_module, setting, tokens))

    return Probe()


def memory_row(module, setting: Setting, tokens: int) -> dict:
    """One real ``training_step`` on a freshly scored batch of ``tokens`` padded tokens, cut as one
    micro-batch; the CUDA allocator's peak over the step."""
    import torch

    from espo_lightning.rollout.tensors import build_rollout_batch

    rows = max(1, tokens // setting.row_width)
    gen = torch.Generator().manual_seed(tokens)
    prompts = torch.randint(3, VOCAB, (rows, setting.row_prompt), generator=gen).tolist()
    completions = torch.randint(3, VOCAB, (rows, setting.row_width - setting.row_prompt), generator=gen).tolist()
    advantages = torch.randn(rows, generator=gen)
    batch = build_rollout_batch(prompts, completions, 0, advantages, torch.zeros(rows), None, 1.0)
    info = {"tokens": tokens, "rows": rows, "positions": int(batch.completion_mask.sum())}
    saved = module.micro_batch_size, module.max_tokens_per_micro_batch
    module.micro_batch_size, module.max_tokens_per_micro_batch = None, rows * setting.row_width  # one pass
    cuda = module.device.type == "cuda"
    try:
        batch = module.score_rollout(batch.to(module.device))  # old log-probs, entropies, groups
        _sync(module)
        if cuda:
            torch.cuda.reset_peak_memory_stats(module.device)
        start, oom = time.perf_counter(), None
        try:
            with module.precision_context():  # as Lightning runs training_step
                module.training_step(batch, 1)  # batch_idx 1: no reward display
            _sync(module)
        except torch.cuda.OutOfMemoryError as err:
            oom = str(err).splitlines()[0]
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(module.device) if cuda else None
        if oom is not None:  # outside the handler, so the failed step's frames are gone
            module.optimizers().zero_grad(set_to_none=True)  # its gradients, for the next row
            torch.cuda.empty_cache()
            return {**info, "error": f"out of memory: {oom}"}
    finally:
        module.micro_batch_size, module.max_tokens_per_micro_batch = saved
    return {**info, "seconds": seconds, "peak": peak}


# ----- the run ----------------------------------------------------------------------------------
def run_fit(model_dir: Path, root: Path, setting: Setting, accelerator: str, measured: Measured,
            keep_dropout: bool):
    import lightning as L
    import torch

    from callbacks import ClipFractionMonitor, EntropyGroupMonitor, GradientUtilizationMonitor, RolloutMonitor
    from espo_lightning.cli import TRAINER_DEFAULTS
    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.engines import HFEngine
    from espo_lightning.tasks.wide_vocab import WideVocabSource, parity_reward

    fused_adam = accelerator == "cuda"  # the foreach default would add a 4 P temporary in the step

    def optimizer(params):
        return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=fused_adam)

    module = PolicyModule(str(model_dir), loss=recording_loss(), optimizer=optimizer, gradient_checkpointing=True,
                          max_tokens_per_micro_batch=setting.fit_micro_tokens, fused_lm_head=True,
                          disable_dropout=not keep_dropout)
    dm = RolloutDataModule(train_data=WideVocabSource(num_prompts=4 * setting.prompts), reward_funcs=[parity_reward],
                           engine=HFEngine(batch_size=setting.prompts), prompts_per_rollout=setting.prompts,
                           num_generations=setting.generations, ppo_epochs=2, max_new_tokens=setting.max_new_tokens,
                           temperature=1.0)
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "num_sanity_val_steps": 0, "max_epochs": 2},
                        accelerator=accelerator, devices=1, precision="bf16-mixed", default_root_dir=str(root),
                        gradient_clip_val=1.0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ClipFractionMonitor(), EntropyGroupMonitor(), GradientUtilizationMonitor(),
                                   RolloutMonitor(), probe_callback(setting, measured)])
    trainer.fit(module, datamodule=dm)
    return module


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def table(setting: Setting, measured: Measured, module, device_name: str, seconds: float) -> list[tuple[str, bool]]:
    """Prints the table; returns the must lines as (name, passed)."""
    cfg = module.policy.config
    params = sum(p.numel() for p in module.policy.parameters())  # tied head counted once
    block = sum(p.numel() for p in module.policy.model.layers[0].parameters())
    chunk = module.scorer.chunk_size or max(1, 2**26 // VOCAB)

    def model_of(row: dict) -> dict[str, int]:
        return memory_model(params, block, row["tokens"], cfg.hidden_size, cfg.num_hidden_layers,
                            cfg.intermediate_size, VOCAB, chunk, row["positions"])

    musts: list[tuple[str, bool]] = []
    rows: list[tuple[str, str, str, str]] = []

    def line(name: str, value: str, expected: str, verdict: str):
        rows.append((name, value, expected, verdict))

    ok = bool(measured.fused)
    musts.append(("fused LM head", ok))
    line("fused LM head", "on" if ok else "OFF (logits path)", "on", "must: " + ("pass" if ok else "FAIL"))
    ratio = max(measured.ratio_dev) if measured.ratio_dev else math.nan
    ok = len(measured.ratio_dev) == 2 and ratio == 0.0
    musts.append(("on-policy ratio", ok))
    line("on-policy ratio: max |ratio - 1|, first minibatch", f"{ratio:.3g} (max |logp - old| "
         f"{max(measured.logp_dev, default=math.nan):.3g}, {len(measured.ratio_dev)} rollouts)", "exactly 0",
         "must: " + ("pass" if ok else "FAIL"))
    clip = max(measured.clip_total) if measured.clip_total else math.nan
    ok = len(measured.clip_total) == 2 and clip == 0.0
    musts.append(("clip/total on-policy", ok))
    line("clip/total, on-policy minibatch", f"{clip:.3g}", "exactly 0", "must: " + ("pass" if ok else "FAIL"))
    for row in measured.memory:
        n = row["tokens"]
        predicted = sum(model_of(row).values())
        name = f"step peak memory, {n:,} tokens/micro-batch"
        if "error" in row:
            line(name, row["error"], f"model {_gib(predicted)}", "info")
            continue
        if row["peak"] is None:
            line(name, "not measured (CPU)", f"model {_gib(predicted)}", "info")
        else:
            frac = row["peak"] / predicted
            line(name, f"{_gib(row['peak'])} ({frac:.2f} x model)", f"<= model {_gib(predicted)}",
                 "info: " + ("within model" if frac <= 1.0 else "ABOVE model"))
    last = max(measured.generation) if measured.generation else None
    if last is not None:
        tok, sec = measured.generation[last]
        line("generation tokens/s (HF engine, rollout 2)", f"{tok / sec:,.0f} ({tok:,} tokens in {sec:.2f} s)", "-",
             "info")
    last = max(measured.step_seconds) if measured.step_seconds else None
    if last is not None:
        tok, sec = sum(measured.step_tokens[last]), sum(measured.step_seconds[last])
        line("training tokens/s (fit, rollout 2)", f"{tok / sec:,.0f} ({tok:,.0f} completion tokens in "
             f"{sec:.2f} s)", "-", "info")
    for row in measured.memory:
        if "seconds" in row:
            line(f"training tokens/s, {row['tokens']:,} tokens/micro-batch",
                 f"{row['tokens'] / row['seconds']:,.0f} (one step, {row['seconds']:.2f} s)", "-", "info")

    print(f"\ngpu_check: {setting.name} (P = {params:,}, H = {cfg.hidden_size}, L = {cfg.num_hidden_layers}, "
          f"I = {cfg.intermediate_size}, V = {VOCAB:,}, chunk C = {chunk}) on {device_name}, bf16-mixed, "
          f"{setting.prompts} prompts x {setting.generations} per rollout, {setting.max_new_tokens} new tokens, "
          f"2 rollouts, {seconds:.1f} s\n")
    widths = [max(len(r[i]) for r in rows + [("check", "measured", "expected", "verdict")]) for i in range(4)]
    header = ("check", "measured", "expected", "verdict")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if measured.memory:
        n, model = measured.memory[-1]["tokens"], model_of(measured.memory[-1])
        print(f"\nmemory model at {n:,} tokens (docs/memory.md, \"What scales with what\", one device):")
        for part, size in model.items():
            print(f"  {part:<50} {_gib(size):>11}")
    return musts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3-shaped model on the CPU, in seconds")
    parser.add_argument("--keep-dropout", type=float, default=None, metavar="P",
                        help="build the model with attention dropout P and keep it in training (a broken "
                             "setting: scoring and training then drop differently and the ratio check must fail)")
    args = parser.parse_args()

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "the full check needs one GPU, `python benchmarks/gpu_check.py --tiny` runs it on the CPU",
              file=sys.stderr)
        return 2
    setting = TINY if args.tiny else FULL
    accelerator = "cpu" if args.tiny else "cuda"
    device_name = "CPU" if args.tiny else torch.cuda.get_device_name(0)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    measured = Measured()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = build_model(Path(tmp) / "model", setting, device=accelerator,
                                attention_dropout=args.keep_dropout or 0.0)
        if accelerator == "cuda":
            torch.cuda.empty_cache()
        module = run_fit(model_dir, Path(tmp) / "run", setting, accelerator, measured,
                         keep_dropout=args.keep_dropout is not None)
        musts = table(setting, measured, module, device_name, time.perf_counter() - start)
    failed = [name for name, ok in musts if not ok]
    if failed:
        print(f"\ngpu_check: FAILED: {', '.join(failed)}")
        return 1
    print("\ngpu_check: every must line passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
