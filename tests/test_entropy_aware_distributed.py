"""Clip-Cov's draw, KL-Cov's top covariances and the high-entropy mask are chosen over the whole
minibatch on all ranks (issue 31 item 3): two gloo ranks, each holding every other row of the
minibatch and cutting its share into micro-batches of 2 rows, take the same step as one process with
the whole minibatch in one pass, within 1e-6 (float32, as training runs).

Each rank does what ``PolicyModule.training_step`` does: the minibatch's counts summed over ranks
(``Normalizer``), ``loss_fn.prepare_minibatch`` once on its whole share (collectives inside), then one
loss call and backward per micro-batch with the rows of the prepared choice. The gradient with
respect to each row's log-probs is that row's share of the step's gradient; the ranks' rows together
must give the single process's gradient row for row. The data is built so that each choice matters:
Clip-Cov has more candidates than it draws, the ranks hold different token counts, and the chosen
tokens fall on both ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORLD = 2
TOL = 1e-6


def _losses():
    from espo_lightning.losses import ClipCovLoss, GRPOLoss, HighEntropyMaskLoss, KLCovLoss, SAPOLoss

    return {
        "clip_cov": lambda: ClipCovLoss(clip_ratio=0.05, cov_lb=0.0, cov_ub=2.0, epsilon_low=0.1, epsilon_high=0.1),
        "kl_cov": lambda: KLCovLoss(kl_cov_ratio=0.05, kl_coef=0.5),
        "mask_dapo": lambda: HighEntropyMaskLoss(GRPOLoss(epsilon_high=0.28, loss_aggregation="token_mean"), 0.2),
        "mask_sapo": lambda: HighEntropyMaskLoss(SAPOLoss(), 0.2),
        "mask_kl_cov": lambda: HighEntropyMaskLoss(KLCovLoss(kl_cov_ratio=0.1), 0.3),
    }


def make_minibatch(path: Path, b: int = 16, t: int = 12) -> None:
    """float32 rows of different lengths, per-response advantages with ties in each prompt group of 4
    (as group advantages have), log-probs moved off the old ones so some ratios clip."""
    g = torch.Generator().manual_seed(0)
    lengths = 1 + (torch.arange(b) * 7) % t
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + 0.2 * torch.randn(b, t, generator=g)
    rewards = torch.rand(b, generator=g).round()
    adv = (rewards - rewards.view(-1, 4).mean(-1).repeat_interleave(4)) * 2
    ent = torch.rand(b, t, generator=g) * 2
    zero = lambda x: torch.where(mask, x, 0.0)  # noqa: E731
    torch.save({"logprobs": zero(logp), "old_logprobs": zero(old), "advantages": adv, "mask": mask,
                "entropies": zero(ent)}, path)


def step(loss_fn, data: dict, rows: torch.Tensor, micro: int | None, distributed: bool):
    """One training step's loss and gradient on ``rows`` of the minibatch: ``(loss, grad [rows, T],
    chosen [rows, T])``."""
    from espo_lightning.losses.base import Normalizer

    mine = {k: v[rows] for k, v in data.items()}
    counts = torch.stack(Normalizer.of(mine["mask"]))
    if distributed:
        torch.distributed.all_reduce(counts)
    counts = Normalizer(counts[0], counts[1])
    ids = loss_fn.prepare_minibatch(old_logprobs=mine["old_logprobs"], advantages=mine["advantages"],
                                    mask=mine["mask"], entropies=mine["entropies"], step=5, distributed=distributed)
    logp = mine["logprobs"].clone().requires_grad_()
    total = torch.zeros(())
    for part in torch.arange(len(rows)).split(micro or len(rows)):
        loss, _ = loss_fn(logprobs=logp[part], old_logprobs=mine["old_logprobs"][part],
                          advantages=mine["advantages"][part], mask=mine["mask"][part],
                          entropies=mine["entropies"][part], group_ids=ids[part], normalizer=counts)
        loss.backward()
        total += loss.detach()
    return total, logp.grad, ids


def _worker(rank: int, world: int, rendezvous: str, data_path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        data = torch.load(data_path)
        rows = torch.arange(rank, len(data["mask"]), world)
        result = {}
        for name, make in _losses().items():
            loss, grad, ids = step(make(), data, rows, micro=2, distributed=True)
            loss = loss.clone()
            dist.all_reduce(loss)  # the step's loss: the sum of the ranks' shares
            result[name] = {"loss": float(loss), "grad": grad.tolist(), "ids": ids.tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_micro_batches_choose_and_step_as_one_process(tmp_path):
    import torch.multiprocessing as mp

    data_path = tmp_path / "minibatch.pt"
    make_minibatch(data_path)
    data = torch.load(data_path)
    tokens = [int(data["mask"][r::WORLD].sum()) for r in range(WORLD)]
    assert tokens[0] != tokens[1], tokens  # a per-rank count would differ from the global one
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), str(data_path), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    everything = torch.arange(len(data["mask"]))
    for name, make in _losses().items():
        loss, grad, ids = step(make(), data, everything, micro=None, distributed=False)
        assert ranks[0][name]["loss"] == pytest.approx(float(loss), abs=TOL), name
        for r in range(WORLD):
            rows = everything[r::WORLD]
            assert ids[rows].tolist() == ranks[r][name]["ids"], name  # the same tokens chosen
            torch.testing.assert_close(torch.tensor(ranks[r][name]["grad"]), grad[rows], rtol=0, atol=TOL)
        chosen = (ids & 1) if name.startswith("mask") else ids
        per_rank = [int(chosen[everything[r::WORLD]].sum()) for r in range(WORLD)]
        assert all(n > 0 for n in per_rank), (name, per_rank)  # the choice spans both ranks
        assert float(grad.abs().max()) > 1e3 * TOL, name


def test_one_process_micro_batches_match_one_pass(tmp_path):
    """The same comparison without ranks (fast): micro-batches of 3 rows against one pass."""
    data_path = tmp_path / "minibatch.pt"
    make_minibatch(data_path)
    data = torch.load(data_path)
    everything = torch.arange(len(data["mask"]))
    for name, make in _losses().items():
        loss_fn = make()
        one = step(loss_fn, data, everything, micro=None, distributed=False)
        parts = step(loss_fn, data, everything, micro=3, distributed=False)
        assert float(parts[0]) == pytest.approx(float(one[0]), abs=TOL), name
        assert torch.equal(parts[2], one[2])
        torch.testing.assert_close(parts[1], one[1], rtol=0, atol=TOL)
    # Clip-Cov draws verl's count from more candidates than that: the draw decides.
    from espo_lightning.losses.selection import token_covariance

    cov, n = token_covariance(data["advantages"].unsqueeze(-1), data["old_logprobs"], data["mask"], False)
    candidates = int((data["mask"] & (cov > 0.0) & (cov < 2.0)).sum())
    drawn = int(step(_losses()["clip_cov"](), data, everything, None, False)[2].sum())
    assert drawn == max(1, int(0.05 * int(n))) and candidates > 2 * drawn, (drawn, candidates)
