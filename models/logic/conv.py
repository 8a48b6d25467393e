"""Convolutional logic layers (Petersen et al. 2024, "Convolutional Differentiable Logic Gate
Networks"): each output channel is a binary tree of learned gates whose 2^depth leaves are fixed,
distinct, randomly chosen cells of the C x k x k receptive field; the tree's gates are shared by
every position (a convolution), and OR pooling (max) halves the resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleyard.models.logic.gates import apply_gates, init_gate_logits, mixed_coefficients


class TreeDepthError(ValueError):
    """A tree needs 2^depth distinct leaves; the receptive field has fewer cells."""


def check_tree_depth(depth: int, in_channels: int, kernel: int) -> None:
    cells = in_channels * kernel * kernel
    if depth < 1 or 2**depth > cells:
        raise TreeDepthError(f"tree depth {depth} needs {2**depth} distinct leaves but the receptive field "
                             f"{in_channels} x {kernel} x {kernel} has {cells} cells; use a depth from 1 to "
                             f"{max(1, cells.bit_length() - 1)}")


class LogicConv2d(nn.Module):
    """[B, C, H, W] in [0, 1] -> [B, channels, H', W'] (stride 1, zero = False padding)."""

    def __init__(self, in_channels: int, channels: int, depth: int = 3, kernel: int = 3, padding: int = 1,
                 residual_init: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        check_tree_depth(depth, in_channels, kernel)
        self.in_channels, self.channels, self.depth = in_channels, channels, depth
        self.kernel, self.padding = kernel, padding
        cells = in_channels * kernel * kernel
        # leaf j of kernel k reads receptive-field cell leaves[k, j] (= c * k*k + dy * k + dx);
        # leaves 2i and 2i+1 feed gate i of the first level
        leaves = torch.stack([torch.randperm(cells, generator=generator)[: 2**depth] for _ in range(channels)])
        self.register_buffer("leaves", leaves)
        # the tree's gates, level by level (2^(d-1) leaf gates first, the root last)
        self.logits = nn.Parameter(init_gate_logits((channels, 2**depth - 1), residual_init))
        self.discrete = False
        self.straight_through = False

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """[B, channels, 2^depth, positions]: each kernel's leaves at every output position."""
        batch, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"LogicConv2d expects {self.in_channels} channels, got shape {tuple(x.shape)}")
        p, k = self.padding, self.kernel
        padded = F.pad(x, (p, p, p, p))
        hp, wp = height + 2 * p, width + 2 * p
        ho, wo = hp - k + 1, wp - k + 1
        c, rest = self.leaves // (k * k), self.leaves % (k * k)
        offset = c * hp * wp + (rest // k) * wp + rest % k  # of each leaf from a window's top-left
        ys = torch.arange(ho, device=x.device)
        xs = torch.arange(wo, device=x.device)
        corner = (ys[:, None] * wp + xs[None, :]).reshape(-1)
        index = (offset[:, :, None] + corner[None, None, :]).reshape(-1)
        leaves = padded.reshape(batch, -1)[:, index]
        return leaves.reshape(batch, self.channels, 2**self.depth, ho * wo), ho, wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes, ho, wo = self._gather(x)
        coeffs = mixed_coefficients(self.logits, self.discrete, self.straight_through and self.training)
        start = 0
        for level in range(self.depth):
            width = 2 ** (self.depth - 1 - level)
            level_coeffs = coeffs[:, start:start + width, None, :]  # broadcast over positions
            nodes = apply_gates(nodes[:, :, 0::2], nodes[:, :, 1::2], level_coeffs)
            start += width
        return nodes.reshape(x.shape[0], self.channels, ho, wo)

    def gates(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.channels}, depth={self.depth}, kernel={self.kernel}, "
                f"padding={self.padding}")


class OrPool2d(nn.Module):
    """Logical OR over each k x k window (stride k): max, its relaxation on [0, 1]."""

    def __init__(self, kernel: int = 2):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel)
