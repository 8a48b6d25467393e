"""A small convolutional classifier (Fashion-MNIST-sized inputs).

Also the feature network of image-generation metrics: `features()` returns the penultimate
activations (a Frechet distance is computed in that space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 32  # channels of the first stage; the second stage has 2x
    hidden: int = 128
    dropout: float = 0.1


class ConvClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.stages = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = cfg.image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * side * side, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)
        )
        self.out = nn.Linear(cfg.hidden, cfg.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def classifier_flops_per_sample(cfg: ClassifierConfig) -> float:
    """Forward + backward FLOPs (2 per multiply-add, backward = 2x forward) of the conv and
    linear layers; activations and pooling are negligible."""
    w, s, c = cfg.width, cfg.image_size, cfg.in_channels
    half, quarter = s // 2, s // 4
    macs = 9 * (s * s * (c * w + w * w) + half * half * (w * 2 * w + 2 * w * 2 * w))
    macs += 2 * w * quarter * quarter * cfg.hidden + cfg.hidden * cfg.num_classes
    return 3 * 2 * float(macs)
