"""Diffusion transformers: preset sizes, FLOPs against torch's FlopCounterMode, conditioning,
and the samplers of the flow and v-prediction processes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaleyard.models.diffusion import flow
from scaleyard.models.diffusion.transformer import (
    ARCHITECTURES,
    DiffusionTransformerConfig,
    build_model,
    count_parameters,
    flops_per_sample,
)  # fmt: skip
from scaleyard.models.presets import NOMINAL, preset, presets


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paper_presets_are_within_3_percent_of_nominal(arch):
    for size, nominal in NOMINAL.items():
        count = count_parameters(presets()[f"{arch}-{size}"])
        assert abs(count / nominal - 1) <= 0.03, (arch, size, count)


def test_cpu_ladder_spans_small_sizes():
    counts = [count_parameters(presets()[f"uvit-cpu-{s}"]) for s in ("xs", "s", "m", "l", "xl")]
    assert counts == sorted(counts) and counts[0] < 2e5 and 1e7 < counts[-1] < 3e7


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flops_per_sample_matches_flop_counter(arch):
    cfg = DiffusionTransformerConfig(arch=arch, width=64, depth=5, heads=4, patch=4, image_size=28, text_dim=32,
                                     text_len=8)
    model = build_model(cfg)
    batch = 3
    x, t = torch.randn(batch, 1, 28, 28), torch.rand(batch)
    text, mask = torch.randn(batch, 8, 32), torch.ones(batch, 8, dtype=torch.bool)
    mask[:, 5:] = False
    # the math backend decomposes attention into matmuls the counter sees (the fused CPU kernel
    # is not counted at all)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, mask).square().mean().backward()
    assert counter.get_total_flops() / batch == pytest.approx(flops_per_sample(cfg), rel=0.05)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_text_changes_the_prediction_and_padding_does_not(arch):
    cfg = preset(f"{arch}-cpu-xs")
    torch.manual_seed(0)
    model = build_model(cfg)
    for parameter in model.parameters():  # leave adaLN-Zero's identity start
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    mask = torch.zeros(2, cfg.text_len, dtype=torch.bool)
    mask[:, :4] = True
    base = model(x, t, text, mask)
    other = text.clone()
    other[:, :4] += 1.0
    assert not torch.allclose(model(x, t, other, mask), base, atol=1e-5)
    padded = text.clone()
    padded[:, 4:] = 100.0  # masked tokens must not matter
    assert torch.allclose(model(x, t, padded, mask), base, atol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiffusionTransformerConfig(image_size=30, patch=4)
    with pytest.raises(ValueError, match="known presets: dit_adaln-cpu-xs"):
        preset("uvit-huge")


@pytest.mark.parametrize("process", flow.PROCESSES)
@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_samplers_recover_a_point_mass_with_the_exact_denoiser(process, sampler):
    """With data a single point x*, the ideal prediction is known in closed form; every sampler
    must carry noise to x*, Heun with fewer steps than Euler."""
    target = torch.full((4, 1, 2, 2), 0.7)

    def exact(x, t, text, mask):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in flow.alpha_sigma(t, process))
        eps = (x - alpha * target) / sigma.clamp(min=1e-8)
        return eps - target if process == "flow" else alpha * eps - sigma * target

    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(4, 1, 1)
    mask = torch.ones(4, 1, dtype=torch.bool)
    steps = 20 if sampler == "heun" else 50
    out = flow.sample(exact, noise, empty, mask, empty, mask, steps=steps, sampler=sampler, process=process)
    # flow paths are straight and DDIM is exact for a point mass; on the curved v-prediction path
    # Euler is first order and Heun second order in the step size
    tolerance = {"euler": 0.05, "heun": 0.005, "ddim": 1e-3}[sampler] if process == "vpred" else 1e-3
    assert torch.allclose(out, target, atol=tolerance)


def conditioned_stub(calls):
    """A denoiser whose output tells the conditional and unconditional halves apart: per sample
    x + t + 10 * text (so a wrong pairing of x, t or text with its half shows as well)."""

    def model(x, t, text, mask):
        calls.append(len(x))
        return x + t.view(-1, 1, 1, 1) + 10 * text.flatten(1).mean(1).view(-1, 1, 1, 1)

    return model


def test_guidance_extrapolates_from_unconditional_towards_conditional():
    calls = []
    model = conditioned_stub(calls)
    x = torch.arange(8.0).view(2, 1, 2, 2)
    t = torch.tensor([0.25, 0.5])
    text, null = torch.full((2, 1, 1), 0.3), torch.full((2, 1, 1), -0.1)
    mask = torch.ones(2, 1, dtype=torch.bool)
    conditional, unconditional = model(x, t, text, mask), model(x, t, null, mask)
    calls.clear()
    assert not torch.allclose(conditional, unconditional)
    assert torch.equal(flow.guided(model, x, t, text, mask, null, mask, 1.0), conditional)
    assert calls == [2]  # scale 1 is the conditional model alone: no unconditional half
    for scale in (0.0, 3.0, 7.5):
        calls.clear()
        expected = unconditional + scale * (conditional - unconditional)
        assert torch.allclose(flow.guided(model, x, t, text, mask, null, mask, scale), expected), scale
        assert calls == [4]  # one batched call for both halves


def test_sampling_with_guidance_follows_the_guided_point_mass():
    """Exact flow denoisers of two point masses, A given the caption and B without: guided
    velocities are the exact velocity of B + s (A - B), so the sampler must land there."""
    a, b, scale = 0.7, -0.2, 2.5

    def exact(x, t, text, mask):
        target = torch.where(text.flatten(1).mean(1) > 0, a, b).view(-1, 1, 1, 1)
        return (x - target) / t.view(-1, 1, 1, 1).clamp(min=1e-8)  # v = eps - x0 on x_t = (1-t) x0 + t eps

    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    text, null = torch.ones(4, 1, 1), torch.zeros(4, 1, 1)
    mask = torch.ones(4, 1, dtype=torch.bool)
    for sampler in flow.SAMPLERS:
        out = flow.sample(exact, noise, text, mask, null, mask, steps=10, sampler=sampler, guidance=scale)
        assert torch.allclose(out, torch.full_like(out, b + scale * (a - b)), atol=1e-4), sampler
    unguided = flow.sample(exact, noise, text, mask, null, mask, steps=10)
    assert torch.allclose(unguided, torch.full_like(unguided, a), atol=1e-4)
