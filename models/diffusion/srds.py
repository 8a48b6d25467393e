"""SRDS: self-refining diffusion samplers (parareal over a diffusion ODE sampler).

The serial sampler's N steps are cut into B blocks (B = round(sqrt(N)) by default). The coarse
solver G takes one step of the same sampler across a whole block; the fine solver F takes the
block's own steps. From a coarse sweep x^0, each iteration p runs F on every block at once (one
batched model call per fine step, or blocks spread over ranks by a `FineSolver` from outside) and
then corrects sequentially with the cheap solver:

    x^p_{i+1} = F(x^{p-1}_i) + G(x^p_i) - G(x^{p-1}_i)

After p iterations the first p blocks are exact, so B iterations give the serial sampler's answer;
it stops earlier when successive final states differ by less than `tolerance`.

The pipelined variant does not wait for a whole iteration: a fine solve starts as soon as its
block's input exists, and every model call carries all fine and coarse steps that are ready (a
dataflow schedule, `srds_pipelined`). Same fixed point, fewer sequential calls.

No library implements this (the paper's repository holds no code), so it is written here over
`flow.ode_step`, which takes per-sample times so blocks at different times share one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from scaleyard.models.diffusion.flow import Adjust, Velocity, check_sampler, ode_step, time_grid

# (block inputs stacked block-major [m * n, ...], their block ids) -> block outputs, same layout
FineSolver = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class BlockPlan:
    """Where the blocks start and end on the serial sampler's time grid."""

    steps: int
    boundaries: tuple[int, ...]  # B + 1 indices into the grid of steps + 1 times

    @property
    def blocks(self) -> int:
        return len(self.boundaries) - 1

    def length(self, block: int) -> int:
        return self.boundaries[block + 1] - self.boundaries[block]


def block_plan(steps: int, blocks: int = 0) -> BlockPlan:
    """B = round(sqrt(steps)) blocks by default, as even as the step count allows."""
    if steps < 1:
        raise ValueError(f"steps={steps}: SRDS needs at least one sampler step")
    count = blocks or max(1, round(math.sqrt(steps)))
    if not 1 <= count <= steps:
        raise ValueError(f"srds blocks={blocks}: must be between 1 and the number of steps ({steps})")
    return BlockPlan(steps, tuple(round(i * steps / count) for i in range(count + 1)))


@dataclass
class SRDSResult:
    sample: torch.Tensor
    iterations: int  # parareal iterations run (B at most)
    changes: list[float] = field(default_factory=list)  # per iteration: max over samples of mean |x^p_B - x^{p-1}_B|
    # sampler steps on the critical path: what wall-clock follows when a batched call costs what a
    # single one does (a GPU with room to spare) or blocks run on ranks of their own; serial: N
    sequential_steps: int = 0
    total_steps: int = 0  # sample-steps computed in all (the compute SRDS spends; serial: N per sample)


class _Solver:
    """The coarse and fine solvers of one sampling problem, on per-sample times."""

    def __init__(self, predict: Velocity, plan: BlockPlan, sampler: str, process: str, device: torch.device,
                 adjust: Adjust | None = None):
        self.predict, self.plan, self.sampler, self.process, self.adjust = predict, plan, sampler, process, adjust
        self.times = time_grid(plan.steps, device)

    def step(self, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """One sampler step per row, from grid index `start` to `end` (per row)."""
        return ode_step(self.predict, x, self.times[start], self.times[end], self.sampler, self.process, self.adjust)

    def coarse(self, x: torch.Tensor, block: int) -> torch.Tensor:
        b = self.plan.boundaries
        rows = x.shape[0]
        return self.step(x, torch.full((rows,), b[block]), torch.full((rows,), b[block + 1]))

    def fine(self, stacked: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        """All the given blocks' fine solves at once: one call per step, rows of finished blocks
        (blocks may differ in length by one step) left out of the call."""
        n = stacked.shape[0] // len(blocks)
        start = torch.tensor([self.plan.boundaries[i] for i in blocks]).repeat_interleave(n)
        length = torch.tensor([self.plan.length(i) for i in blocks]).repeat_interleave(n)
        x = stacked.clone()
        for j in range(int(length.max())):
            active = length > j
            if bool(active.all()):
                x = self.step(x, start + j, start + j + 1)
            else:
                x[active] = self.step(x[active], start[active] + j, start[active] + j + 1)
        return x


def _change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.float() - old.float()).abs().flatten(1).mean(1).max())


@torch.no_grad()
def srds(predict: Velocity, noise: torch.Tensor, steps: int, sampler: str = "euler", process: str = "flow",
         blocks: int = 0, tolerance: float = 0.0, max_iterations: int = 0,
         distribute: Callable[[FineSolver], FineSolver] | None = None, adjust: Adjust | None = None) -> SRDSResult:
    """Parareal refinement of the serial sampler `flow.integrate(predict, noise, steps, sampler,
    process, adjust)`. tolerance 0 runs to the exact answer (B iterations); `distribute` wraps the
    batched fine solve (e.g. to spread the blocks over ranks) and must return what it returns."""
    check_sampler(sampler, process)
    plan = block_plan(steps, blocks)
    solver = _Solver(predict, plan, sampler, process, noise.device, adjust)
    fine = distribute(solver.fine) if distribute else solver.fine
    n, count = noise.shape[0], plan.blocks
    states = [noise]  # x^p_i, i = 0..B
    coarse_of = []  # G(x^p_i) as last computed
    for i in range(count):
        coarse_of.append(solver.coarse(states[i], i))
        states.append(coarse_of[i])
    result = SRDSResult(states[-1], 0, sequential_steps=count, total_steps=count * n)
    for p in range(1, min(max_iterations or count, count) + 1):
        first = p - 1  # blocks before this one saw their exact input in an earlier iteration
        todo = list(range(first, count))
        fine_out = fine(torch.cat(states[first:count]), todo).split(n)
        new = states[: first + 1] + [fine_out[0]]  # x^p_{first+1} = F(x_first): its input did not change
        for i in range(first + 1, count):
            coarse_new = solver.coarse(new[i], i)
            new.append(fine_out[i - first] + coarse_new - coarse_of[i])
            coarse_of[i] = coarse_new
        result.changes.append(_change(new[-1], states[-1]))
        states = new
        result.iterations = p
        result.sequential_steps += max(plan.length(i) for i in todo) + len(todo) - 1
        result.total_steps += (sum(plan.length(i) for i in todo) + len(todo) - 1) * n
        if tolerance > 0 and result.changes[-1] < tolerance:
            break
    result.sample = states[-1]
    return result


@torch.no_grad()
def srds_pipelined(predict: Velocity, noise: torch.Tensor, steps: int, sampler: str = "euler", process: str = "flow",
                   blocks: int = 0, tolerance: float = 0.0, max_iterations: int = 0,
                   adjust: Adjust | None = None) -> SRDSResult:
    """`srds` on a dataflow schedule: every model call advances all fine solves in flight by one
    step and takes every coarse step whose input exists, so iteration p's fine solve of block i
    starts as soon as x^p_i is known instead of after the whole of iteration p - 1.

    States are keyed (p, i) with p <= i (for i < p, x^p_i = x^i_i: those blocks stopped changing):
    x^0_0 = noise, x^0_{i+1} = G(x^0_i), x^p_p = F(x^{p-1}_{p-1}),
    x^p_{i+1} = F(x^{p-1}_i) + G(x^p_i) - G(x^{p-1}_i) for i >= p >= 1."""
    check_sampler(sampler, process)
    plan = block_plan(steps, blocks)
    solver = _Solver(predict, plan, sampler, process, noise.device, adjust)
    count, bounds = plan.blocks, plan.boundaries
    last = min(max_iterations or count, count)
    states: dict[tuple[int, int], torch.Tensor] = {(0, 0): noise}
    coarse: dict[tuple[int, int], torch.Tensor] = {}
    fine: dict[tuple[int, int], torch.Tensor] = {}
    running: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # fine solves in flight: (state, steps done)
    n = noise.shape[0]
    result = SRDSResult(noise, 0)
    while (last, count) not in states:
        starts = [k for k in states if k[0] < last and k[1] < count and k not in fine and k not in running]
        running.update({k: (states[k], 0) for k in starts})
        coarse_keys = [k for k in states if k[1] < count and k not in coarse]
        fine_keys = list(running)
        rows = [running[k][0] for k in fine_keys] + [states[k] for k in coarse_keys]
        begin = [bounds[i] + running[(q, i)][1] for q, i in fine_keys] + [bounds[i] for _, i in coarse_keys]
        end = [b + 1 for b in begin[: len(fine_keys)]] + [bounds[i + 1] for _, i in coarse_keys]
        out = solver.step(torch.cat(rows), torch.tensor(begin).repeat_interleave(n),
                          torch.tensor(end).repeat_interleave(n)).split(n)
        result.sequential_steps += 1
        result.total_steps += len(rows) * n
        for key, value in zip(fine_keys, out[: len(fine_keys)]):
            done = running[key][1] + 1
            if done == plan.length(key[1]):
                fine[key] = value
                del running[key]
            else:
                running[key] = (value, done)
        coarse.update(zip(coarse_keys, out[len(fine_keys):]))
        _resolve(states, coarse, fine, count, last)
        newest = max((p for p, i in states if i == count), default=0)
        if newest > result.iterations:
            result.iterations = newest
            result.changes.append(_change(states[(newest, count)], states[(newest - 1, count)]))
            if tolerance > 0 and result.changes[-1] < tolerance:
                result.sample = states[(newest, count)]
                return result
    result.sample = states[(last, count)]
    return result


def _resolve(states: dict, coarse: dict, fine: dict, count: int, last: int) -> None:
    """Add every state whose inputs are now known (the recurrence in `srds_pipelined`)."""
    for p in range(last + 1):
        if p >= 1 and (p, p) not in states and (p - 1, p - 1) in fine:
            states[(p, p)] = fine[(p - 1, p - 1)]  # its input x^{p-1}_{p-1} is exact, so no correction
        for i in range(p, count):
            if (p, i + 1) in states or (p, i) not in coarse:
                continue
            if p == 0:
                states[(0, i + 1)] = coarse[(0, i)]
            elif (p - 1, i) in fine and (p - 1, i) in coarse:
                states[(p, i + 1)] = fine[(p - 1, i)] + coarse[(p, i)] - coarse[(p - 1, i)]
