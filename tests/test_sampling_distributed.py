"""Dynamic sampling on two real processes (gloo): the decision to run another sampling round is
global, so a rank that already holds its groups keeps generating with the rank that does not (a
sharded ``generate`` is a collective), and both ranks serve full rollouts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TESTS = Path(__file__).resolve().parent


def _rank(rank: int, world: int, rendezvous: str, model_dir: str, out: str) -> None:
    sys.path.insert(0, str(TESTS))
    import torch.distributed as dist

    import reward_toys
    from espo_lightning.losses import ESPOLoss
    from espo_lightning.training.module import PolicyModule
    from espo_lightning.rollout.datamodule import RolloutDataModule
    from espo_lightning.engines import HFEngine
    from espo_lightning.tasks.addition import AdditionSource

    # a rendezvous file, not a port found free and released (another process could take it between)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = PolicyModule(model_dir, loss=ESPOLoss())
        module.configure_model()
        dm = RolloutDataModule(train_data=AdditionSource(num_problems=40, seed=3), engine=HFEngine(),
                               reward_funcs=[reward_toys.varies_by_rank], prompts_per_rollout=6, num_generations=2,
                               max_new_tokens=2, drop_zero_std_groups=True, max_sampling_rounds=5)
        dm.trainer = type("T", (), {"lightning_module": module, "global_rank": rank, "world_size": world,
                                    "current_epoch": 0, "global_step": 0})()
        batch, stats = dm.rollout(epoch=0)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "rounds": stats.sampling_rounds, "rows": len(batch), "groups": stats.num_groups,
            "next_start": dm.walk.next_start}))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    finally:
        dist.destroy_process_group()


def test_ranks_run_the_same_sampling_rounds(tiny_model_dir, tmp_path):
    rendezvous = str(tmp_path / "rendezvous")
    mp.start_processes(_rank, args=(2, rendezvous, tiny_model_dir, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # rank 1 gets one group with variance per round and needs 3 (6 prompts / 2 ranks); rank 0 has
    # its 3 after one round but generates 3 rounds too
    assert r0["rounds"] == r1["rounds"] == 3 and r0["groups"] == r1["groups"] == 9
    assert r0["rows"] == r1["rows"] == 6  # 3 groups x 2 completions on each rank
    assert r0["next_start"] == r1["next_start"] == 18  # both walked past 3 rounds of 6 prompts
