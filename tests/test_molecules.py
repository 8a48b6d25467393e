"""The molecule flow's network and sampler (models/molecules): E(3) equivariance, permutation
equivariance, masks, centre of mass through sampling, and guidance that reduces to the plain sampler."""

from __future__ import annotations

import pytest
import torch

from scaleyard.models.molecules.egnn import EGNNConfig, MoleculeFlowNet, PropertyNet, centre
from scaleyard.models.molecules.flow import SamplerConfig, flow_loss, sample
from scaleyard.models.molecules.guidance import GuidanceConfig, Guide

CFG = EGNNConfig(num_types=4, hidden=16, layers=2)


def nets():
    torch.manual_seed(0)
    return MoleculeFlowNet(CFG).double(), PropertyNet(CFG, 2).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64) * 1.5 * mask[..., None]
    a = torch.randint(0, 5, (2, 6), generator=g) * mask  # 4 = MASK
    return x, a, mask


def random_rotation(seed=2):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # orthogonal; may be a reflection too (EGNN is E(3)-equivariant)


def test_flow_net_rotates_and_translates_with_its_input_and_its_logits_do_not():
    flow, predictor = nets()
    x, a, mask = batch()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    rot, shift = random_rotation(), torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    x1, logits = flow(x, a, t, t, mask)
    x1_moved, logits_moved = flow((x @ rot.T + shift) * mask[..., None], a, t, t, mask)
    assert torch.allclose(x1_moved, (x1 @ rot.T + shift) * mask[..., None], atol=1e-9)
    assert torch.allclose(logits_moved, logits, atol=1e-9)
    assert x1[1, 4:].abs().max() == 0  # padding stays put
    props = predictor(x, a.clamp(max=3), mask)
    assert torch.allclose(predictor(x @ rot.T + shift, a.clamp(max=3), mask), props, atol=1e-9)


def test_atom_order_and_padding_width_do_not_matter():
    flow, predictor = nets()
    x, a, mask = batch()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x1, logits = flow(x, a, t, t, mask)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x1_p, logits_p = flow(x[:, perm], a[:, perm], t, t, mask[:, perm])
    assert torch.allclose(x1_p, x1[:, perm], atol=1e-9) and torch.allclose(logits_p, logits[:, perm], atol=1e-9)
    # the smaller molecule alone (no padding) gives the same outputs as inside the padded batch
    x1_alone, logits_alone = flow(x[1:, :4], a[1:, :4], t[1:], t[1:], mask[1:, :4])
    assert torch.allclose(x1_alone, x1[1:, :4], atol=1e-9) and torch.allclose(logits_alone, logits[1:, :4], atol=1e-9)
    types = a.clamp(max=3)
    assert torch.allclose(predictor(x[:, perm], types[:, perm], mask[:, perm]), predictor(x, types, mask), atol=1e-9)


class Recorder(torch.nn.Module):
    """The flow model, recording the centre of mass of every x_t it is asked about."""

    def __init__(self, net):
        super().__init__()
        self.net, self.cfg, self.centres = net, net.cfg, []

    def forward(self, x, a, t_x, t_a, mask):
        self.centres.append(centre(x, mask).abs().max().item())
        return self.net(x, a, t_x, t_a, mask)


def guide_for(predictor, **knobs):
    return Guide(predictor, 0, torch.tensor([1.0, -1.0, 0.5]), GuidanceConfig(**knobs))


@pytest.mark.parametrize("guided", [False, True])
def test_centre_of_mass_stays_zero_through_sampling(guided):
    flow, predictor = nets()
    flow, predictor = flow.float(), predictor.float()
    recorder = Recorder(flow)
    guide = guide_for(predictor, candidates=4, rho=0.5, mu=0.5) if guided else None
    x, a, mask = sample(recorder, torch.tensor([5, 3, 7]), SamplerConfig(8), torch.Generator().manual_seed(0), guide)
    assert len(recorder.centres) >= 8 and max(recorder.centres) < 1e-5
    assert centre(x, mask).abs().max() < 1e-5
    assert (x[~mask] == 0).all() and ((a >= 0) & (a < 4)).all()  # every atom unmasked at the end


def test_guidance_with_one_candidate_and_zero_step_sizes_is_the_unguided_sampler():
    flow, predictor = nets()
    flow, predictor = flow.float(), predictor.float()
    counts, steps = torch.tensor([5, 3, 7]), SamplerConfig(10)
    plain = sample(flow, counts, steps, torch.Generator().manual_seed(3))
    neutral = sample(flow, counts, steps, torch.Generator().manual_seed(3), guide_for(predictor, candidates=1,
                                                                                        rho=0.0, mu=0.0))
    assert all(torch.equal(p, n) for p, n in zip(plain, neutral))
    steered = sample(flow, counts, steps, torch.Generator().manual_seed(3), guide_for(predictor, candidates=1,
                                                                                        rho=0.5, mu=0.0))
    assert not torch.equal(plain[0], steered[0])  # the same path with a step size does move coordinates


class Spread(torch.nn.Module):
    """A known property: mean squared distance from the centre plus 4 x the share of class-1 atoms
    (sensitive to both coordinates and types, so both halves of the guidance are exercised)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    def forward(self, x, a, mask):
        m = mask.float()
        radius = ((x - centre(x, mask)) ** 2).sum(-1)
        value = (radius * m).sum(1) / m.sum(1) + 4 * ((a == 1).float() * m).sum(1) / m.sum(1)
        return value[:, None]


@pytest.mark.parametrize("part", ["types", "coordinates"])
def test_guidance_moves_a_known_property_toward_the_target(part):
    torch.manual_seed(0)
    flow, spread = MoleculeFlowNet(CFG), Spread()
    counts, target = torch.full((16,), 6), 8.0
    knobs = {"candidates": 32, "tau": 0.5, "rho": 0.0, "mu": 0.0} if part == "types" else \
        {"candidates": 1, "rho": 0.5, "mu": 0.5, "clip": 2.0}
    plain = sample(flow, counts, SamplerConfig(10), torch.Generator().manual_seed(1))
    guided = sample(flow, counts, SamplerConfig(10), torch.Generator().manual_seed(1),
                    Guide(spread, 0, torch.full((16,), target), GuidanceConfig(**knobs)))
    error_plain = (spread(*plain)[:, 0] - target).abs().mean()
    error_guided = (spread(*guided)[:, 0] - target).abs().mean()
    assert error_guided < 0.7 * error_plain, (error_guided, error_plain)


def test_flow_loss_trains_down():
    torch.manual_seed(0)
    flow = MoleculeFlowNet(CFG)
    x, a, mask = batch()
    x, a = x.float(), a.clamp(max=3)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(1)  # the same noise and times every step: the loss must fall
        loss, metrics = flow_loss(flow, 4, x, a, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and set(metrics) == {"coord_mse", "type_ce"}
