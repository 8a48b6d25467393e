"""Sample images on disk: one PNG per image, written whole or not at all (a killed sampling run
resumes by skipping the files that exist), and a grid of the first ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], as the shards store images."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def write_png(pixels: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: a PNG that exists is complete


def read_png(path: Path) -> torch.Tensor:
    """A written sample back as [C, H, W] in [-1, 1]."""
    pixels = np.array(Image.open(path))  # a writable copy: torch refuses to wrap read-only arrays
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def write_grid(paths: list[Path], out: Path, columns: int) -> None:
    """The given PNGs tiled `columns` per row with 2-pixel grey gutters."""
    tiles = [np.asarray(Image.open(p)) for p in paths]
    h, w = tiles[0].shape[:2]
    channels = 1 if tiles[0].ndim == 2 else tiles[0].shape[2]
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), channels), 128, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = tile.reshape(h, w, channels)
    write_png(grid, out)
