"""Text-to-image diffusion transformers: DiT-adaLN, DiT-cross and U-ViT.

All three map (noisy image x_t [B, C, H, W], time t [B] in [0, 1], text tokens [B, T, text_dim],
text mask [B, T]) to a prediction of the same shape as x_t (a velocity for flow matching).
- DiT-adaLN (Peebles & Xie): pooled text + time condition every block through adaLN-Zero.
- DiT-cross (PixArt-style): time through adaLN-Zero, text through a cross-attention per block.
- U-ViT (Bao et al.): time, text and image tokens in one sequence, long skips between the
  in- and out-blocks, no adaLN.

Defaults follow the reference code (facebookresearch/DiT `models.py`, PixArt-alpha `PixArt.py`,
baofff/U-ViT `libs/uvit_t2i.py`), initialisation included: no query/key norm, PixArt's
cross-attention on the un-normalised tokens with its output projection zeroed (identity at
init), U-ViT's 3x3 conv after unpatchify, no qkv bias and the raw sinusoid as its time token.
`qk_norm`, `cross_norm`, `conv_out`, `qkv_bias` and `time_mlp` switch the alternatives on or off;
what still differs from the references is listed in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scaleyard.models.meta import shapes_only
from scaleyard.models.transformer import MLP, Attention, PatchEmbed, TimestepEmbedding, modulate, sincos_2d, unpatchify

ARCHITECTURES = ("dit_adaln", "dit_cross", "uvit")
# What a config written before each of these keys existed meant: the model it describes had
# query/key norm, the pre-cross-attention norm, U-ViT's qkv bias and time MLP always, and never
# the U-ViT output conv.
SAVED_BEFORE: dict[str, Any] = {"qk_norm": True, "cross_norm": True, "conv_out": False, "qkv_bias": True,
                                "time_mlp": True}


@dataclass(frozen=True)
class DiffusionTransformerConfig:
    arch: str = "uvit"
    width: int = 128
    depth: int = 4
    heads: int = 4
    patch: int = 2
    image_size: int = 28
    channels: int = 1
    text_dim: int = 128  # width of the text encoder's token embeddings
    text_len: int = 16  # text tokens the model sees (U-ViT's sequence includes them)
    mlp_ratio: float = 4.0
    # per-head LayerNorm (no learnable scale) of queries and keys: bounds attention logits, but
    # neither reference has it and it touches exactly the attention conditioning being compared
    qk_norm: bool = False
    # DiT-cross: a LayerNorm (with affine) before the cross-attention; PixArt-alpha feeds the
    # block's tokens to it as they are
    cross_norm: bool = False
    conv_out: bool = True  # U-ViT's 3x3 conv after unpatchify (on in the reference); DiT has none
    # U-ViT only (DiT's reference has both, always): a bias on the q/k/v projection, and the time
    # token through DiT's sinusoid MLP; the reference has neither (qkv_bias=False, mlp_time_embed=False)
    qkv_bias: bool = False
    time_mlp: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.image_size % self.patch:
            raise ValueError(f"image size {self.image_size} is not divisible by the patch size {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.arch == "uvit" and self.depth % 2 == 0:
            raise ValueError(f"U-ViT depth counts in-blocks + mid block + out-blocks and must be odd, got {self.depth}")

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> DiffusionTransformerConfig:
        """A config saved as a dict (dataclasses.asdict) by an earlier version: a key it lacks
        takes the value that reproduces what that model was (SAVED_BEFORE), not today's default."""
        return cls(**{**SAVED_BEFORE, **values})

    @property
    def side(self) -> int:
        return self.image_size // self.patch

    @property
    def image_tokens(self) -> int:
        return self.side**2


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig, cross: bool):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio)
        self.cross = Attention(d, cfg.heads, context_dim=d, qk_norm=cfg.qk_norm) if cross else None
        self.norm_cross = nn.LayerNorm(d, eps=1e-6) if cross and cfg.cross_norm else nn.Identity()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """DiT-adaLN (`arch="dit_adaln"`) and DiT-cross (`arch="dit_cross"`)."""

    def __init__(self, cfg: DiffusionTransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, cross = cfg.width, cfg.arch == "dit_cross"
        self.patch_embed = PatchEmbed(cfg.channels, cfg.patch, d)
        self.register_buffer("pos", sincos_2d(d, cfg.side)[None], persistent=False)
        self.time = TimestepEmbedding(d)
        self.text_proj = nn.Linear(cfg.text_dim, d)  # pooled text (adaLN) or text tokens (cross)
        self.blocks = nn.ModuleList(DiTBlock(cfg, cross) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, cfg.patch**2 * cfg.channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's (and PixArt-alpha's) initialisation: Xavier-uniform linears with zero biases, the
        patch embedding initialised as the linear it is, N(0, 0.02) for the time MLP and the
        text projection (DiT's label table, PixArt's caption MLP), and zeros where a branch must
        start as nothing: adaLN-Zero's modulation (gates 0: each block is the identity), the
        cross-attention's output projection (PixArt) and the final layer (prediction 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for layer in (self.time.mlp[0], self.time.mlp[2], self.text_proj):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final_ada[1], self.out]
        for block in self.blocks:
            zeroed.append(block.ada[1])
            if block.cross is not None:
                zeroed.append(block.cross.proj)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x) + self.pos
        c = self.time(t)
        if self.cfg.arch == "dit_adaln":
            weights = text_mask.to(text.dtype)[..., None]
            pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            c = c + self.text_proj(pooled)
            context = mask = None
        else:
            context, mask = self.text_proj(text), text_mask
        for block in self.blocks:
            tokens = block(tokens, c, context, mask)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        tokens = self.out(modulate(self.final_norm(tokens), shift, scale))
        return unpatchify(tokens, self.cfg.channels, self.cfg.patch, self.cfg.side)


class UViTBlock(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig, skip: bool):
        super().__init__()
        d = cfg.width
        self.skip = nn.Linear(2 * d, d) if skip else None
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(d), MLP(d, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), context_mask=mask)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = PatchEmbed(cfg.channels, cfg.patch, d)
        self.time = TimestepEmbedding(d, mlp=cfg.time_mlp)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.text_len + cfg.image_tokens, d))
        half = cfg.depth // 2  # depth = half in-blocks + 1 mid block + half out-blocks
        self.in_blocks = nn.ModuleList(UViTBlock(cfg, skip=False) for _ in range(half))
        self.mid_block = UViTBlock(cfg, skip=False)
        self.out_blocks = nn.ModuleList(UViTBlock(cfg, skip=True) for _ in range(half))
        self.final_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.patch**2 * cfg.channels)
        self.conv = nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1) if cfg.conv_out else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """U-ViT's initialisation: truncated N(0, 0.02) for the positions and every linear (zero
        biases), LayerNorms at 1/0; convolutions (patch embedding, output conv) keep PyTorch's.
        Nothing is zeroed, so unlike DiT no block is the identity at init."""
        nn.init.trunc_normal_(self.pos, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:  # the qkv projection has none by default
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        patches = self.patch_embed(x)
        time = self.time(t).to(patches.dtype)[:, None]  # the raw sinusoid is float32
        tokens = torch.cat([time, self.text_proj(text), patches], dim=1) + self.pos
        ones = torch.ones(batch, 1, dtype=torch.bool, device=x.device)
        image = torch.ones(batch, self.cfg.image_tokens, dtype=torch.bool, device=x.device)
        mask = torch.cat([ones, text_mask.bool(), image], dim=1)
        skips = []
        for block in self.in_blocks:
            tokens = block(tokens, mask)
            skips.append(tokens)
        tokens = self.mid_block(tokens, mask)
        for block in self.out_blocks:
            tokens = block(tokens, mask, skips.pop())
        tokens = self.out(self.final_norm(tokens[:, -self.cfg.image_tokens :]))
        images = unpatchify(tokens, self.cfg.channels, self.cfg.patch, self.cfg.side)
        return self.conv(images) if self.conv is not None else images


def build_model(cfg: DiffusionTransformerConfig) -> nn.Module:
    return UViT(cfg) if cfg.arch == "uvit" else DiT(cfg)


# Tensor-parallel plan (applied by the platform's engine.name=megatron; vocabulary in
# platform/engines/tensor_parallel.py). Megatron's split of a transformer block: the fused q|k|v
# (or q and k|v) and the first MLP layer are column-parallel (a rank computes heads/tp heads and
# hidden/tp MLP units), the attention output and second MLP layer row-parallel (one all-reduce
# each); DiT's adaLN modulation is column-parallel with its output gathered. Every Attention/MLP
# of models/transformer.py matches, so the text encoder's blocks split too.
TP_PLAN = {
    "modules": {
        "*.attn.qkv": {"style": "colwise", "parts": 3},
        "*.cross.q": "colwise",
        "*.cross.kv": {"style": "colwise", "parts": 2},
        "*.attn.proj": "rowwise",
        "*.cross.proj": "rowwise",
        "*.mlp.fc1": "colwise",
        "*.mlp.fc2": "rowwise",
        "*.ada.1": "colwise_gather_output",
    },
    "divide": {"*.attn": ["heads"], "*.cross": ["heads"]},  # Attention.heads: the heads a rank holds
}


def count_parameters(cfg: DiffusionTransformerConfig) -> int:
    """Exact trainable parameter count, without allocating the weights (meta device)."""
    with shapes_only():
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(cfg: DiffusionTransformerConfig) -> float:
    """Training FLOPs (forward + backward = 3 x forward, 2 FLOPs per multiply-add) of one sample.
    Per-token matmuls scale with the tokens they see; attention scores with tokens^2; adaLN
    modulation and the time MLP run once per sample (the correction torchtitan's Flux applies)."""
    d, depth, s, t = cfg.width, cfg.depth, cfg.image_tokens, cfg.text_len
    hidden = int(d * cfg.mlp_ratio)
    per_token_block = 4 * d * d + 2 * d * hidden  # qkv + proj + MLP
    patch_in = cfg.channels * cfg.patch**2 * d
    patch_out = d * cfg.patch**2 * cfg.channels
    time_mlp = 256 * d + d * d if cfg.arch != "uvit" or cfg.time_mlp else 0
    if cfg.arch == "uvit":
        n = 1 + t + s
        macs = depth * (n * per_token_block + 2 * n * n * d)
        macs += (depth // 2) * n * 2 * d * d  # long-skip projections
        macs += s * patch_in + t * cfg.text_dim * d + s * patch_out + time_mlp
        if cfg.conv_out:
            macs += cfg.image_size**2 * cfg.channels**2 * 9
    else:
        macs = depth * (s * per_token_block + 2 * s * s * d + 6 * d * d)  # adaLN: once per sample
        macs += s * patch_in + s * patch_out + 2 * d * d + time_mlp
        if cfg.arch == "dit_cross":
            macs += depth * (s * 2 * d * d + t * 2 * d * d + 2 * s * t * d)  # q/proj, k/v, scores
            macs += t * cfg.text_dim * d
        else:
            macs += cfg.text_dim * d  # pooled text projection
    return 6.0 * macs
