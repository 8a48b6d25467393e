"""Diffusion transformers: preset sizes, FLOPs against torch's FlopCounterMode, conditioning,
and the samplers of the flow and v-prediction processes."""

import dataclasses

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


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model moved off its zero-initialised start, so every branch contributes."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def conditioning(cfg: DiffusionTransformerConfig, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=generator)
    mask = torch.ones(batch, cfg.text_len, dtype=torch.bool)
    mask[:, 5:] = False
    return x, torch.rand(batch, generator=generator), text, mask


@pytest.mark.parametrize("cross_norm", [False, True])
@pytest.mark.parametrize("arch", ["dit_adaln", "dit_cross"])
def test_dit_blocks_and_the_cross_attention_branch_are_the_identity_at_init(arch, cross_norm):
    """adaLN-Zero (DiT) and PixArt's zeroed cross-attention output: at init every block returns
    its input exactly, whatever the condition, and the model predicts 0 (zeroed final layer)."""
    cfg = dataclasses.replace(preset(f"{arch}-cpu-xs"), cross_norm=cross_norm)
    torch.manual_seed(0)
    model = build_model(cfg)
    x, t, text, mask = conditioning(cfg)
    tokens = torch.randn(2, cfg.image_tokens, cfg.width)
    c = torch.randn(2, cfg.width)
    context = model.text_proj(text) if arch == "dit_cross" else None
    for block in model.blocks:
        assert torch.equal(block(tokens, c, context, mask if context is not None else None), tokens)
        if arch == "dit_cross":  # the branch alone, not only through a zero gate elsewhere
            assert torch.equal(block.cross(block.norm_cross(tokens), context, mask), torch.zeros_like(tokens))
    assert torch.equal(model(x, t, text, mask), torch.zeros_like(x))


def test_initialisation_follows_the_references():
    """DiT: Xavier-uniform linears, the patch embedding as a linear, N(0, 0.02) time MLP; U-ViT:
    truncated N(0, 0.02) linears and positions; zero biases in both."""
    torch.manual_seed(0)
    dit = build_model(preset("dit_cross-cpu-m"))
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.any() and name not in ("time.mlp.0", "time.mlp.2",
                                                                                        "text_proj"):
            bound = (6 / sum(module.weight.shape)) ** 0.5
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.9 * bound, name
            assert not module.bias.any(), name
    patch = dit.patch_embed.proj.weight.flatten(1)
    assert patch.abs().max() <= (6 / sum(patch.shape)) ** 0.5
    assert dit.time.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    uvit = build_model(preset("uvit-cpu-m"))
    for name, module in uvit.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.numel() > 1000:
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            assert module.bias is None if name.endswith("attn.qkv") else not module.bias.any(), name
    assert uvit.pos.std().item() == pytest.approx(0.02, rel=0.1)


def test_defaults_follow_the_references_and_options_switch_the_features():
    """No query/key norm and no norm before PixArt's cross-attention by default; U-ViT's output conv
    on, its qkv bias and time MLP off by default. Each option really changes the model (same
    weights, other output; or other parameters)."""
    from scaleyard.models.transformer import Attention

    for arch in ARCHITECTURES:
        cfg = preset(f"{arch}-cpu-xs")
        assert not cfg.qk_norm and not cfg.cross_norm and cfg.conv_out
        plain = perturbed(build_model(cfg))
        attentions = [m for m in plain.modules() if isinstance(m, Attention)]
        assert attentions and all(isinstance(m.q_norm, torch.nn.Identity) for m in attentions)
        normed = build_model(dataclasses.replace(cfg, qk_norm=True))
        assert all(isinstance(m.k_norm, torch.nn.LayerNorm) for m in normed.modules() if isinstance(m, Attention))
        normed.load_state_dict(plain.state_dict())  # the norm has no weights: same parameters, other model
        inputs = conditioning(cfg)
        assert not torch.allclose(normed(*inputs), plain(*inputs), atol=1e-4), arch
    cross = preset("dit_cross-cpu-xs")
    assert all(isinstance(b.norm_cross, torch.nn.Identity) for b in build_model(cross).blocks)
    with_norm = build_model(dataclasses.replace(cross, cross_norm=True))
    assert all(isinstance(b.norm_cross, torch.nn.LayerNorm) for b in with_norm.blocks)
    assert count_parameters(dataclasses.replace(cross, cross_norm=True)) - count_parameters(cross) == (
        2 * cross.width * cross.depth)
    uvit = preset("uvit-cpu-xs")
    off = dataclasses.replace(uvit, conv_out=False)
    assert build_model(uvit).conv is not None and build_model(off).conv is None
    assert count_parameters(uvit) - count_parameters(off) == uvit.channels**2 * 9 + uvit.channels
    assert flops_per_sample(uvit) > flops_per_sample(off)
    assert not uvit.qkv_bias and not uvit.time_mlp
    model = build_model(uvit)
    assert all(block.attn.qkv.bias is None for block in model.modules() if hasattr(block, "attn"))
    assert model.time.mlp is None and model.time(torch.rand(3)).shape == (3, uvit.width)  # the raw sinusoid
    d, depth = uvit.width, uvit.depth
    assert count_parameters(dataclasses.replace(uvit, qkv_bias=True)) - count_parameters(uvit) == 3 * d * depth
    assert count_parameters(dataclasses.replace(uvit, time_mlp=True)) - count_parameters(uvit) == 257 * d + d * d + d
    for arch in ("dit_adaln", "dit_cross"):  # DiT's reference has both, always: the options are U-ViT's
        dit = build_model(preset(f"{arch}-cpu-xs"))
        assert dit.blocks[0].attn.qkv.bias is not None and dit.time.mlp is not None


def test_a_config_saved_before_the_options_keeps_its_architecture():
    """A dict saved (dataclasses.asdict) before the architecture switches existed describes the
    model of then: it reads as that model, so its weights load as they were saved."""
    old = dataclasses.asdict(preset("uvit-cpu-xs"))
    for key in ("qk_norm", "cross_norm", "qkv_bias", "time_mlp"):
        del old[key]
    old["conv_out"] = False  # what every saved config had before the default changed
    cfg = DiffusionTransformerConfig.from_saved(old)
    assert cfg.qk_norm and cfg.cross_norm and not cfg.conv_out and cfg.qkv_bias and cfg.time_mlp
    before = build_model(cfg)  # the old architecture: qkv bias, time MLP, no conv
    assert before.conv is None and before.time.mlp is not None and before.in_blocks[0].attn.qkv.bias is not None
    new = DiffusionTransformerConfig.from_saved(dataclasses.asdict(preset("uvit-cpu-xs")))
    assert not new.qk_norm and new.conv_out  # keys that are there are kept
