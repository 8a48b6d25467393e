"""SRDS (models/diffusion/srds.py): the parareal sampler reproduces the serial sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.srds import block_plan, srds, srds_pipelined


class NonlinearDenoiser(nn.Module):
    """A small random network whose ODE has curved paths, so coarse and fine solves disagree and
    the parareal corrections matter (a trained model's paths are straighter)."""

    def __init__(self, channels: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Conv2d(channels + 1, 16, 3, padding=1)
        self.outer = nn.Conv2d(16, channels, 3, padding=1)

    def forward(self, x, t, text, mask):
        time = t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return 2 * self.outer(torch.tanh(self.inner(torch.cat([x, time], 1)))) + text.view(-1, 1, 1, 1)


def problem(n: int = 3, guidance: float = 1.0):
    model = NonlinearDenoiser()
    text = torch.linspace(-1, 1, n).view(n, 1, 1)
    mask = torch.ones(n, 1, dtype=torch.bool)
    predict = flow.conditioned(model, text, mask, torch.zeros_like(text), mask, guidance)
    noise = torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    return predict, noise


def test_block_plan_is_sqrt_n_blocks_covering_every_step():
    assert block_plan(25).boundaries == (0, 5, 10, 15, 20, 25)
    plan = block_plan(10)
    assert plan.blocks == 3 and plan.boundaries[0] == 0 and plan.boundaries[-1] == 10
    assert sorted({plan.length(i) for i in range(plan.blocks)}) == [3, 4]
    with pytest.raises(ValueError, match="blocks=30"):
        block_plan(25, 30)


@pytest.mark.parametrize("process", flow.PROCESSES)
@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_srds_equals_the_serial_sampler_after_b_iterations(sampler, process):
    predict, noise = problem(guidance=2.0)
    serial = flow.integrate(predict, noise, 12, sampler, process)
    result = srds(predict, noise, 12, sampler, process)
    assert result.iterations == 3  # B = round(sqrt(12))
    assert torch.allclose(result.sample, serial, atol=1e-5), float((result.sample - serial).abs().max())
    coarse_only = srds(predict, noise, 12, sampler, process, max_iterations=1)
    # the corrections are not trivially exact: one iteration is measurably off
    assert (coarse_only.sample - serial).abs().max() > 10 * max(float((result.sample - serial).abs().max()), 1e-6)
    pipelined = srds_pipelined(predict, noise, 12, sampler, process)
    assert torch.allclose(pipelined.sample, serial, atol=1e-5)


def test_tolerance_zero_runs_to_the_serial_answer_and_a_loose_one_stops_early():
    predict, noise = problem()
    serial = flow.integrate(predict, noise, 16)
    exact = srds(predict, noise, 16, tolerance=0.0)
    assert exact.iterations == 4 and torch.allclose(exact.sample, serial, atol=1e-5)
    assert exact.changes[-1] < exact.changes[0]  # iterates converge
    loose = srds(predict, noise, 16, tolerance=exact.changes[1] * 1.01)
    assert loose.iterations == 2
    assert loose.sequential_steps < exact.sequential_steps


def test_pipelining_shortens_the_critical_path():
    predict, noise = problem()
    plain, pipelined = srds(predict, noise, 25), srds_pipelined(predict, noise, 25)
    assert torch.allclose(plain.sample, pipelined.sample, atol=1e-5)
    assert pipelined.sequential_steps < plain.sequential_steps


def _srds_on_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from scaleyard.platform.srds_ranks import blocks_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        solved: list[list[int]] = []  # the blocks this rank's fine solves took, per iteration

        def recorded(fine):
            def solve(stacked, blocks):
                solved.append(list(blocks))
                return fine(stacked, blocks)
            return blocks_over_ranks(solve)

        predict, noise = problem(guidance=2.0)
        result = srds(predict, noise, 12, "heun", "vpred", distribute=recorded)
        torch.save({"sample": result.sample, "iterations": result.iterations, "solved": solved}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_blocks_spread_over_two_gloo_ranks_give_the_single_process_answer(tmp_path):
    """3 blocks over 2 ranks: uneven shares (2 + 1, the second padded for all_gather)."""
    import torch.multiprocessing as mp

    mp.spawn(_srds_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    predict, noise = problem(guidance=2.0)
    solved_single: list[int] = []

    def recorded(fine):
        def solve(stacked, blocks):
            solved_single.extend(blocks)
            return fine(stacked, blocks)
        return solve

    single = srds(predict, noise, 12, "heun", "vpred", distribute=recorded)
    got = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for part in got:
        assert part["iterations"] == single.iterations == 3
        gap = float((part["sample"] - single.sample).abs().max())
        assert torch.allclose(part["sample"], single.sample, atol=1e-6), gap
    # the ranks shared the work: every block solve of the single process ran on exactly one rank
    solved = [sum(part["solved"], []) for part in got]
    assert solved[0] and solved[1] and sorted(solved[0] + solved[1]) == sorted(solved_single)
