"""The safe denoiser (models/diffusion/safe_denoiser.py) on a distribution whose exact denoiser is
known: two point masses, one of them the negation set's."""

from __future__ import annotations

import pytest
import torch

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.safe_denoiser import PAPER_SIGMA, SafeDenoiser, paper_sigma_for

DIM = 16
ALLOWED, NEGATED = torch.ones(DIM), -torch.ones(DIM)
CENTRES = torch.stack([ALLOWED, NEGATED])


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow process x_t = (1 - t) x0 + t eps with x0 in {ALLOWED, NEGATED} at equal odds:
    E[x0 | x_t] by Bayes' rule, and the velocity eps - x0 = (x_t - E[x0 | x_t]) / t."""
    t = t.view(-1, 1)
    log_odds = -(x[:, None, :] - (1 - t)[:, None] * CENTRES[None]).square().sum(-1) / (2 * t**2)
    x0 = torch.softmax(log_odds, 1) @ CENTRES
    return (x - x0) / t


def negated_share(samples: torch.Tensor) -> float:
    closer = (samples - NEGATED).norm(dim=1) < (samples - ALLOWED).norm(dim=1)
    return float(closer.float().mean())


def negation_set(count: int = 32) -> torch.Tensor:
    return NEGATED + 0.05 * torch.randn(count, DIM, generator=torch.Generator().manual_seed(1))


def noise(count: int = 1000) -> torch.Tensor:
    return torch.randn(count, DIM, generator=torch.Generator().manual_seed(0))


def test_the_push_steers_samples_off_the_negated_mode_and_leaves_the_rest_exact():
    plain = flow.integrate(exact_velocity, noise(), 50)
    safe = flow.integrate(exact_velocity, noise(), 50, adjust=SafeDenoiser(negation_set()))
    assert 0.4 < negated_share(plain) < 0.6  # the exact sampler reproduces the 50/50 mixture
    assert negated_share(safe) < 0.1  # measured: 0.51 -> 0.04 at the paper's scale 0.33
    kept = (safe - ALLOWED).norm(dim=1) < (safe - NEGATED).norm(dim=1)
    # samples steered away still land on the allowed mode itself, not between the modes
    assert torch.allclose(safe[kept], ALLOWED.expand_as(safe[kept]), atol=1e-4)


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_scale_zero_or_a_window_no_step_falls_in_is_the_plain_sampler_exactly(sampler):
    x = noise(64)
    plain = flow.integrate(exact_velocity, x, 4, sampler)
    off = SafeDenoiser(negation_set(), scale=0.0)
    # 4 steps evaluate at t = 1, 0.75, 0.5, 0.25 (and 0): none inside [0.6, 0.7]
    outside = SafeDenoiser(negation_set(), window=(0.6, 0.7))
    assert torch.equal(flow.integrate(exact_velocity, x, 4, sampler, adjust=off), plain)
    assert torch.equal(flow.integrate(exact_velocity, x, 4, sampler, adjust=outside), plain)
    # the control: a step starting inside the window is changed (the exact denoiser's final samples
    # snap to the modes, so compare one step)
    inside = SafeDenoiser(negation_set(), window=(0.5, 0.5))
    t_now, t_next = torch.full((64,), 0.5), torch.full((64,), 0.25)
    assert not torch.equal(flow.ode_step(exact_velocity, x, t_now, t_next, sampler, adjust=inside),
                           flow.ode_step(exact_velocity, x, t_now, t_next, sampler))


def test_far_from_the_negation_set_the_estimate_is_untouched():
    safe = SafeDenoiser(negation_set())
    far = ALLOWED.expand(3, DIM) * 40  # every kernel weight underflows: the 1e-8 keeps the push at 0
    edited, applied = safe(far, torch.zeros_like(far), torch.ones(3))
    assert bool(applied.all()) and torch.equal(edited, far)


def test_the_threshold_variant_pushes_only_samples_with_enough_kernel_mass():
    safe = SafeDenoiser(negation_set(), threshold_quantile=0.5)
    near = NEGATED.expand(2, DIM) + 0.01
    far = torch.zeros(2, DIM)  # the midpoint: some kernel mass, far less than the set's own
    _, applied = safe(torch.cat([near, far]), torch.zeros(4, DIM), torch.ones(4))
    assert applied.tolist() == [True, True, False, False]


def test_the_bandwidth_is_the_papers_at_its_dimension_and_an_empty_set_is_refused():
    assert paper_sigma_for(4 * 64 * 64) == pytest.approx(PAPER_SIGMA)
    assert SafeDenoiser(negation_set()).sigma == pytest.approx(PAPER_SIGMA * (DIM / 16384) ** 0.25)
    with pytest.raises(ValueError, match="empty"):
        SafeDenoiser(torch.empty(0, DIM))
