"""Named sizes of the diffusion transformers: a CPU ladder for development and tests, and the
paper ladder (0.3B-8B) for GPU clusters. `scaleyard models` prints them with their exact
parameter counts and training FLOPs per sample."""

from __future__ import annotations

import dataclasses

from scaleyard.models.diffusion.transformer import ARCHITECTURES, DiffusionTransformerConfig

# (width, depth, heads) per architecture and nominal size. Paper ladder: 256x256 images through a
# 4-channel f=8 latent (32x32, patch 2 -> 256 tokens), 64 text tokens of width 384 (MiniLM).
# Depths solved so the exact count is within 3% of the nominal size (tests/test_t2i_models.py).
PAPER_SHAPES: dict[str, dict[str, tuple[int, int, int]]] = {
    "dit_adaln": {"0.3B": (1024, 16, 16), "0.6B": (1280, 20, 20), "1B": (1536, 23, 24), "2.3B": (2048, 30, 32),
                  "4B": (2560, 34, 40), "8B": (3072, 47, 48)},
    "dit_cross": {"0.3B": (1024, 13, 16), "0.6B": (1280, 16, 20), "1B": (1536, 19, 24), "2.3B": (2048, 25, 32),
                  "4B": (2560, 28, 40), "8B": (3072, 38, 48)},
    "uvit": {"0.3B": (896, 29, 14), "0.6B": (1152, 35, 18), "1B": (1536, 33, 24), "2.3B": (2048, 43, 32),
             "4B": (2560, 47, 40), "8B": (3072, 65, 48)},
}
PAPER_DATA = {"image_size": 32, "channels": 4, "patch": 2, "text_dim": 384, "text_len": 64}
NOMINAL = {"0.3B": 0.3e9, "0.6B": 0.6e9, "1B": 1e9, "2.3B": 2.3e9, "4B": 4e9, "8B": 8e9}

# CPU ladder: 28x28 grey images (Fashion-MNIST), patch 4 -> 49 tokens, a small text encoder.
CPU_SHAPES = {"xs": (32, 2, 2), "s": (64, 4, 4), "m": (128, 6, 4), "l": (256, 8, 8), "xl": (384, 12, 6)}
CPU_DATA = {"image_size": 28, "channels": 1, "patch": 4, "text_dim": 64, "text_len": 16}


def _shape_for(arch: str, width: int, depth: int, heads: int) -> dict[str, int]:
    # U-ViT counts in-blocks + mid + out-blocks: an odd depth with the same number of blocks
    return {"arch": arch, "width": width, "depth": depth + 1 if arch == "uvit" and depth % 2 == 0 else depth,
            "heads": heads}


def presets() -> dict[str, DiffusionTransformerConfig]:
    out = {}
    for arch in ARCHITECTURES:
        for size, (width, depth, heads) in CPU_SHAPES.items():
            out[f"{arch}-cpu-{size}"] = DiffusionTransformerConfig(**_shape_for(arch, width, depth, heads), **CPU_DATA)
        for size, (width, depth, heads) in PAPER_SHAPES[arch].items():
            out[f"{arch}-{size}"] = DiffusionTransformerConfig(**_shape_for(arch, width, depth, heads), **PAPER_DATA)
    return out


def preset(name: str, **changes) -> DiffusionTransformerConfig:
    known = presets()
    if name not in known:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(known)}")
    return dataclasses.replace(known[name], **changes) if changes else known[name]
