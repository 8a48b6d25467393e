"""SRDS across ranks: the fine solves of one parareal iteration spread over the process group
(gloo on CPU, NCCL on GPU), so blocks that a single device would batch run in parallel.

Every rank runs the same coarse corrections (cheap, and deterministic for the same inputs); the
fine inputs are broadcast from rank 0 first, so all ranks solve from one state even where a device
is not bitwise reproducible, and the results are all-gathered so every rank can continue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

# models/diffusion/srds.py's FineSolver, restated: platform/ does not import models/
FineSolver = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def blocks_over_ranks(fine: FineSolver) -> FineSolver:
    """Wrap the batched fine solve: rank r takes a contiguous share of the blocks."""

    def solve(stacked: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        dist.broadcast(stacked, src=0)
        rows = stacked.shape[0] // len(blocks)
        share = -(-len(blocks) // world)
        spans = [(min(r * share, len(blocks)), min((r + 1) * share, len(blocks))) for r in range(world)]
        lo, hi = spans[rank]
        mine = torch.zeros((share * rows, *stacked.shape[1:]), dtype=stacked.dtype, device=stacked.device)
        if hi > lo:
            mine[: (hi - lo) * rows] = fine(stacked[lo * rows: hi * rows], list(blocks)[lo:hi])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)  # equal shapes: each rank's share padded to `share` blocks
        return torch.cat([part[: (b - a) * rows] for part, (a, b) in zip(gathered, spans)])

    return solve
