"""Memory at the real vocabulary size: one rollout and its updates with V = 151,936 and 512-token
completions (16 prompts x 8, minibatches of 64, micro-batches of 8) stay under 4 GiB of peak RSS on
a CPU. A single minibatch's fp32 logits would be 64 x 512 x 151,936 x 4 B = 18.6 GiB: the run only
fits because no pass (generation aside, which holds [128, V] per step) ever materialises [B, T, V].

The run is a separate process so that its peak RSS (``ru_maxrss``) is its own. Completions are
decoded greedily: CPU ``torch.multinomial`` draws an exponential variate per vocabulary entry, 0.5 s
per step for 128 x 151,936 probabilities, which would make this test minutes of sampling; greedy
decoding makes the same [128, V] logits per step and completions of the same length. (A group's
greedy completions are identical, so advantages are 0; the step still runs every forward and
backward at full size: no loss skips zero advantages.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def worker(model_dir: str, out: str) -> None:
    import resource
    import time
    from dataclasses import replace

    import lightning as L
    import torch

    from espo_lightning.losses import ESPOLoss
    from espo_lightning.module import PolicyModule
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.rollout.engines import HFEngine
    from espo_lightning.tasks.wide_vocab import WideVocabSource, parity_reward

    class GreedyHFEngine(HFEngine):
        def generate(self, prompt_ids, sampling, policy):
            repeated = [p for p in prompt_ids for _ in range(sampling.n)]  # generate's greedy mode has n = 1
            return super().generate(repeated, replace(sampling, greedy=True, n=1), policy)

    steps = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({k: float(v) for k, v in outputs["metrics"].items() if k.startswith(("count", "clip"))})

    torch.manual_seed(0)
    module = PolicyModule(model_dir, loss=ESPOLoss(), micro_batch_size=8,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    dm = RolloutDataModule(train_data=WideVocabSource(num_prompts=64), reward_funcs=[parity_reward],
                           engine=GreedyHFEngine(batch_size=128), prompts_per_rollout=16, num_generations=8,
                           minibatch_size=64, max_new_tokens=512)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    Path(out).write_text(json.dumps({
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": time.perf_counter() - start, "global_step": trainer.global_step, "steps": steps,
        "rollout": {"generation_s": dm.last_rollout.generation_time_s, "scoring_s": dm.last_rollout.scoring_time_s,
                    "tokens": dm.last_rollout.generated_tokens},
    }))


@pytest.mark.slow
def test_rollout_and_update_at_qwen_vocabulary_fit_in_4_gib(tmp_path):
    from espo_lightning.tasks.wide_vocab import build_wide_vocab_model

    model_dir = build_wide_vocab_model(tmp_path / "wide-vocab")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(model_dir), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    print(json.dumps(result))
    assert result["global_step"] == 2
    assert result["rollout"]["tokens"] >= 0.99 * 128 * 512  # a random head almost never samples EOS
    assert all(s["count/tokens"] >= 0.99 * 64 * 512 for s in result["steps"])
    assert result["peak_rss_bytes"] <= 4 * GIB, result["peak_rss_bytes"] / GIB


if __name__ == "__main__":
    worker(*sys.argv[1:3])
