"""Token selections made over a whole minibatch on all ranks: Clip-Cov's random draw, KL-Cov's top
covariances and the high-entropy mask (DESIGN section 2, "Entropy-aware baselines").

A minibatch is cut into micro-batches (and spread over ranks); the loss sees one micro-batch at a
time. A selection that depends on the whole minibatch (a quantile, a top-k, a random fraction of all
valid tokens) is therefore made once per optimizer step, before the micro-batches, by
``PolicyLoss.prepare_minibatch``; the result travels row-sliced with every micro-batch as
``group_ids``. Each selection here is defined by global quantities only (sums over ranks, a
threshold, the sorted pool of candidate values), so 1 process and N ranks with any micro-batches pick
the same tokens. Collectives use the default process group, as ``PolicyModule`` does for its counts.

Everything runs under ``no_grad`` in float64: a selection is a decision, not part of the graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_default() -> bool:
    """Whether a process group of more than one rank is up (then selections reduce over it)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_sum(values: Tensor, distributed: bool) -> Tensor:
    if distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_1d(values: Tensor, distributed: bool) -> tuple[Tensor, int]:
    """The 1-D ``values`` of every rank concatenated in rank order (ranks may hold different counts),
    and where this rank's part starts in it."""
    if not distributed:
        return values, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = values.new_zeros(max(sizes))
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def _mine(chosen: Tensor, offset: int, local: Tensor, shape_mask: Tensor) -> Tensor:
    """A bool like ``shape_mask`` with the tokens ``local[chosen - offset]`` set, for the entries of
    ``chosen`` (positions in the gathered pool) that fall in this rank's part of it."""
    chosen = chosen - offset
    chosen = chosen[(chosen >= 0) & (chosen < local.numel())]
    out = torch.zeros(shape_mask.numel(), dtype=torch.bool, device=shape_mask.device)
    out[local[chosen]] = True
    return out.view(shape_mask.shape)


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation, as TRL's ``top_entropy_quantile`` uses)
    with two ``kthvalue`` calls instead of a sort; no size limit (``torch.quantile`` refuses inputs of
    more than 2**24 elements). ``values``: 1-D, non-empty."""
    n = values.numel()
    rank = q * (n - 1)
    below = min(int(rank), n - 1)
    above = min(below + 1, n - 1)
    low = torch.kthvalue(values, below + 1).values
    high = torch.kthvalue(values, above + 1).values if above != below else low
    return torch.lerp(low, high, values.new_tensor(rank - below))


@torch.no_grad()
def token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor, distributed: bool) -> tuple[Tensor, Tensor]:
    """``cov_t = (A_t - mean A) (logp_t - mean logp)`` ``[B, T]`` float64 (0 off-mask), the means over
    the valid tokens of all ranks, and the global number of valid tokens ``[]``.

    Args:
        advantages: ``[B, 1]`` or ``[B, T]``.
        logprobs: ``[B, T]`` the log-probs the covariance is taken with (detached here).
        mask: ``[B, T]`` bool.
    """
    maskf = mask.to(torch.float64)
    adv = advantages.detach().to(torch.float64).expand_as(maskf) * maskf  # [B, T]
    logp = logprobs.detach().to(torch.float64) * maskf
    sums = _all_sum(torch.stack([adv.sum(), logp.sum(), maskf.sum()]), distributed)  # [3]
    n = sums[2]
    mean_a, mean_l = sums[0] / n.clamp_min(1), sums[1] / n.clamp_min(1)
    return (adv - mean_a) * (logp - mean_l) * maskf, n


@torch.no_grad()
def random_draw(cov: Tensor, candidates: Tensor, count: int, generator: torch.Generator | None,
                distributed: bool) -> Tensor:
    """Clip-Cov's draw: ``min(count, candidates)`` of the candidate tokens of all ranks, uniformly at
    random, as a bool ``[B, T]``.

    A token is labelled by its place in the sorted pool of the candidates' covariance values of all
    ranks, not by its row, so no row order or micro-batch cut changes the draw: ``torch.randperm``
    with ``generator`` (the same seed on every rank) picks places in the pool. Only tokens of exactly
    equal covariance are told apart by position (rank, then row-major order). ``generator`` None uses
    torch's global generator."""
    local = candidates.reshape(-1).nonzero().squeeze(-1)  # [n] flat indices of this rank's candidates
    pool, offset = gather_1d(cov.reshape(-1)[local], distributed)
    if pool.numel() == 0 or count <= 0:
        return torch.zeros_like(candidates)
    order = torch.sort(pool, stable=True).indices  # place in the sorted pool -> position in the pool
    device = generator.device if generator is not None else torch.device("cpu")
    places = torch.randperm(pool.numel(), generator=generator, device=device)[:count].to(pool.device)
    return _mine(order[places], offset, local, candidates)


@torch.no_grad()
def top_count(cov: Tensor, mask: Tensor, count: int, distributed: bool) -> Tensor:
    """KL-Cov's choice: the ``count`` valid tokens of all ranks with the largest ``cov`` (all of them
    if fewer), as a bool ``[B, T]``; exactly tied values are taken in (rank, row-major) order. Each
    rank sends only its own ``count`` largest values: the global top ``count`` is among them."""
    valid = mask.reshape(-1).nonzero().squeeze(-1)  # [n]
    if count <= 0:
        return torch.zeros_like(mask)
    ranked = torch.sort(cov.reshape(-1)[valid], descending=True, stable=True)
    local = valid[ranked.indices[:count]]  # this rank's candidates for the top, best first
    pool, offset = gather_1d(ranked.values[:count], distributed)
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    top = torch.sort(pool, descending=True, stable=True).indices[:count]
    return _mine(top, offset, local, mask)


@torch.no_grad()
def high_entropy_tokens(entropies: Tensor, mask: Tensor, fraction: float, distributed: bool) -> Tensor:
    """The valid tokens whose entropy is at or above the ``1 - fraction`` quantile (linear
    interpolation) of the entropies of all valid tokens of all ranks, as a bool ``[B, T]``."""
    ent = entropies.detach().to(torch.float64)
    pool, _ = gather_1d(ent[mask], distributed)
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    return mask & (ent >= linear_quantile(pool, 1.0 - fraction))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step): the same draw on every rank at a step, a new one each step."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
