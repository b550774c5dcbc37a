"""Loading under FSDP2 on several ranks without a full copy of the model on each (``espo_lightning.policy.loading``).

Two real processes (gloo) run ``PolicyModule.configure_model`` under a stand-in trainer whose
strategy is a ``ModelParallelStrategy`` over both ranks (what ``configure_model`` reads of ``fit``'s
trainer; ``test_distributed_parity`` runs the same path inside ``fit``), on a Qwen3-architecture
checkpoint saved with ``save_pretrained`` in a temporary folder:

- a ~510 MB fp32 model (hidden 1,024, 8 layers, V = 32,000, tied head, saved in 200 MB files): each
  rank's resident memory may grow by at most 0.6 x one fp32 copy of the model while it loads (0.55x
  measured; the old per-rank ``from_pretrained`` grew it by 1.09x and 1.15x), and after gathering
  (``full_tensor``) every parameter is bit-identical to a plain ``from_pretrained``, as are the
  non-persistent rotary buffers (``inv_freq``) that no checkpoint holds and the config; the head
  stays tied; gradient checkpointing and ``disable_dropout`` still apply; a forward pass gives the
  plain model's logits.
- a tiny model with an untied head in bf16 and a KL reference read from a ``.bin`` checkpoint (the
  fallback: ``from_pretrained`` on rank 0 only, streamed the same way): both models identical to
  ``from_pretrained``, and after no-grad forwards the frozen reference's root (embeddings, head, final
  norm) is sharded again, while the policy's root stays gathered as FSDP2 does for a root by default
  (``reshard_after_forward=None``), so the check is able to fail.

Peak resident memory is measured with the kernel's high-water mark (``VmHWM``), reset just before the
load by writing 5 to ``/proc/self/clear_refs``.
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
BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=8, head_dim=64, vocab_size=32000, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False)
RSS_LIMIT = 0.6  # x one fp32 copy of the model, per rank


def save_model(folder: Path, config: dict, bin_format: bool = False, seed: int = 0,
               max_shard_size: str | None = None) -> int:
    """A randomly initialised Qwen3 model and a character tokenizer in ``folder`` (safetensors, in
    files of at most ``max_shard_size`` with an index, or one ``pytorch_model.bin``); returns the
    bytes of one fp32 copy of its parameters."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from espo_lightning.tasks.warm_start import build_tokenizer

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=128, attention_dropout=0.1, **config))
    with torch.no_grad():  # norms away from their init, so that loading them is seen
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if bin_format:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    build_tokenizer("0123456789+=").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


# ----- the two ranks ---------------------------------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(mode: str, model_dir: str, out_dir: str, reference_dir: str = "") -> None:
    import gc

    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule

    class Strategy(ModelParallelStrategy):
        root_device = torch.device("cpu")

    class Trainer:  # what configure_model reads of the trainer
        strategy = Strategy(data_parallel_size=2, tensor_parallel_size=1)
        world_size = 2
        precision = "32-true"

    # a rendezvous file, not a port found free and released (another process could take it between)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    beta = 0.1 if mode == "reference" else 0.0
    module = PolicyModule(model_dir, loss=ESPOLoss(beta=beta), reference_model=reference_dir or None,
                          dtype="bfloat16" if mode == "reference" else "float32", gradient_checkpointing=True)
    module._trainer = Trainer()
    module._device_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    # modules the load imports (a fixed cost, not the model's)
    import espo_lightning.policy.loading as _loading  # noqa: F401
    import torch.distributed.fsdp as _fsdp  # noqa: F401
    import transformers.models.qwen3.modeling_qwen3 as _qwen3  # noqa: F401

    gc.collect()
    dist.barrier()
    if mode == "missing":
        from espo_lightning.errors import ConfigError

        with pytest.raises(ConfigError) as err:
            module.configure_model()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"error": str(err.value)}))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort at exit otherwise)
        dist.destroy_process_group()
        return
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    module.configure_model()
    result = {"peak_growth": _status("VmHWM") - before, "after_growth": _status("VmRSS") - before}
    dist.barrier()

    models = {"policy": (module.policy, model_dir)}
    if module.reference is not None:
        models["reference"] = (module.reference, reference_dir or model_dir)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    for label, (model, path) in models.items():
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if label == "reference" or mode == "reference":
            gathered = sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor))
            result[f"{label}_gathered_after_forward"] = gathered
        if rank != 0:
            continue
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype)
        expected = plain.state_dict()
        result[f"{label}_keys_equal"] = sorted(full) == sorted(expected)
        result[f"{label}_mismatched"] = [k for k in expected if not torch.equal(full[k], expected[k])]
        result[f"{label}_dtypes"] = sorted({str(v.dtype) for v in full.values()})
        plain_buffers = dict(plain.named_buffers())
        buffers = {k: v for k, v in model.named_buffers() if k in plain_buffers}
        result[f"{label}_buffers"] = sorted(buffers)
        result[f"{label}_buffers_mismatched"] = [k for k in plain_buffers
                                                 if k not in buffers or not torch.equal(buffers[k], plain_buffers[k])]
        result[f"{label}_config_equal"] = model.config.to_dict() == plain.config.to_dict()
        result[f"{label}_tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        with torch.no_grad():
            result[f"{label}_logit_diff"] = float((logits - plain(input_ids=ids).logits).abs().max())
        del plain, expected
    if rank == 0:
        policy = module.policy
        result["gradient_checkpointing"] = policy.is_gradient_checkpointing
        result["dropouts"] = sorted({float(m.attention_dropout) for m in policy.modules()
                                     if hasattr(m, "attention_dropout")})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(mode: str, model_dir: Path, out: Path, reference_dir: Path | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    drop = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(WORLD_SIZE="2", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(model_dir), str(out), str(reference_dir or "")],
                              cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"rank failed:\n{log[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# ----- the tests -----------------------------------------------------------------------------------
def test_reader_reads_row_ranges_of_sharded_files_into_any_dtype(tmp_path):
    """Rank 0's reader: rows of a tensor from the right file of an index, straight into a tensor of
    the file's dtype or converted into another (through the scratch buffer), and 0-dim tensors."""
    from safetensors.torch import save_file

    from espo_lightning.policy.loading import SafetensorsReader

    a = torch.randn(7, 3, 5, dtype=torch.bfloat16)
    b, c = torch.arange(10, dtype=torch.int64), torch.tensor(2.5)
    save_file({"a": a}, tmp_path / "one.safetensors")
    save_file({"b": b, "c": c}, tmp_path / "two.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors", "c": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reader = SafetensorsReader(tmp_path)
    assert reader.shape("a") == (7, 3, 5) and reader.shape("c") == ()
    out = torch.empty(3, 15, dtype=torch.float32)
    reader.read_into("a", 2, out)
    assert torch.equal(out, a[2:5].float().reshape(3, 15))
    same = torch.empty(4, 15, dtype=torch.bfloat16)
    reader.read_into("a", 3, same)
    assert torch.equal(same, a[3:7].reshape(4, 15))
    rows = torch.empty(4, 1, dtype=torch.int64)
    reader.read_into("b", 6, rows)
    assert rows.flatten().tolist() == [6, 7, 8, 9]
    scalar = torch.empty(1, 1, dtype=torch.float64)
    reader.read_into("c", 0, scalar)
    assert float(scalar) == 2.5


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_load_a_fraction_of_the_model_each_and_the_same_weights(tmp_path):
    fp32_bytes = save_model(tmp_path / "model", BIG, max_shard_size="200MB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()  # several files, as real checkpoints
    ranks = run_ranks("policy", tmp_path / "model", tmp_path / "out")
    growth = [r["peak_growth"] for r in ranks]
    peaks = ", ".join(f"{g / 2**20:.0f} MiB ({g / fp32_bytes:.2f}x)" for g in growth)
    after = ", ".join(f"{r['after_growth'] / 2**20:.0f} MiB" for r in ranks)
    print(f"one fp32 copy {fp32_bytes / 2**20:.0f} MiB; peak RSS growth per rank during load {peaks}; "
          f"resident growth after load {after}")
    assert max(growth) <= RSS_LIMIT * fp32_bytes, (growth, fp32_bytes)
    r0 = ranks[0]
    assert r0["policy_keys_equal"] and r0["policy_mismatched"] == []
    assert r0["policy_dtypes"] == ["torch.float32"]
    assert "model.rotary_emb.inv_freq" in r0["policy_buffers"] and r0["policy_buffers_mismatched"] == []
    assert r0["policy_tied"] and r0["policy_config_equal"]
    assert r0["policy_logit_diff"] <= 1e-5
    assert r0["gradient_checkpointing"] and r0["dropouts"] == [0.0]


@pytest.mark.slow
@pytest.mark.distributed
def test_reference_from_a_bin_checkpoint_and_its_root_resharded_after_forward(tmp_path):
    save_model(tmp_path / "model", TINY)
    save_model(tmp_path / "reference", TINY, bin_format=True, seed=1)
    ranks = run_ranks("reference", tmp_path / "model", tmp_path / "out", tmp_path / "reference")
    r0 = ranks[0]
    for label in ("policy", "reference"):
        assert r0[f"{label}_keys_equal"] and r0[f"{label}_mismatched"] == [], label
        assert r0[f"{label}_dtypes"] == ["torch.bfloat16"], label
        assert r0[f"{label}_buffers_mismatched"] == [], label
        assert not r0[f"{label}_tied"] and r0[f"{label}_config_equal"], label
        assert r0[f"{label}_logit_diff"] <= 1e-5, label
    for r in ranks:
        assert r["reference_gathered_after_forward"] == []
        # FSDP2's default for a root: kept gathered after forward (the backward needs it at once)
        assert "lm_head.weight" in r["policy_gathered_after_forward"]


@pytest.mark.slow
@pytest.mark.distributed
def test_missing_weights_fail_on_every_rank_with_one_line(tmp_path):
    save_model(tmp_path / "model", TINY)
    for f in (tmp_path / "model").glob("*.safetensors"):
        f.unlink()
    ranks = run_ranks("missing", tmp_path / "model", tmp_path / "out")
    for r in ranks:
        assert r["error"].startswith("model.model_name_or_path: cannot load a causal LM from"), r["error"]
        assert "\n" not in r["error"]


if __name__ == "__main__":
    worker(*sys.argv[1:5])
