"""Transformer parts shared by DiT and U-ViT: attention on PyTorch's scaled_dot_product_attention
(flash / memory-efficient kernels on GPU), MLP, adaLN modulation, time and position embeddings,
patchify. Single-device code; parallelism is applied from outside."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention from the
    queries' tokens to `context` (whose width may differ)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # per-head RMS-style normalisation of q and k keeps attention logits bounded at scale
        self.q_norm = nn.LayerNorm(dim // heads, elementwise_affine=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, elementwise_affine=False) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        mask = context_mask[:, None, None, :] if context_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # flatten, not reshape to `dim`: under tensor parallelism a rank holds heads/tp of the heads
        return self.proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> sinusoid (256) -> MLP, as in DiT; `mlp=False`: the sinusoid of width `dim`
    itself (float32), U-ViT's time token (its reference's mlp_time_embed=False)."""

    def __init__(self, dim: int, frequencies: int = 256, max_period: float = 10_000.0, mlp: bool = True):
        super().__init__()
        self.frequencies, self.max_period = (frequencies if mlp else dim), max_period
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim)) if mlp else None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        angles = (t.float() * 1000.0)[:, None] * freqs[None]
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return sinusoid if self.mlp is None else self.mlp(sinusoid.to(self.mlp[0].weight.dtype))


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [side*side, dim]."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for 2-D sin-cos positions")
    quarter = dim // 4
    # computed on the CPU whatever the default device: a model built on "meta" to count or plan it
    # would otherwise send arange through torch's Python decompositions (3 s of imports)
    cpu = {"dtype": torch.float64, "device": "cpu"}
    omega = 1.0 / 10_000 ** (torch.arange(quarter, **cpu) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side, **cpu), torch.arange(side, **cpu), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, channels: int, patch: int, side: int) -> torch.Tensor:
    """[B, side*side, patch*patch*channels] -> [B, channels, side*patch, side*patch]."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, side, side, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(batch, channels, side * patch, side * patch)
