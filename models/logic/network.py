"""A logic-gate network for images: thresholds -> [tree conv + OR pool]* -> logic layers -> GroupSum.

Images in [0, 1] become bits by comparing each pixel with `thresholds` evenly spaced levels
(one binary channel per input channel and level). In relaxed mode (training) every gate is the
softmax mixture of the 16 gates; in discretised mode (`discretised(net)`) every gate is its
argmax, and on bits the network is exactly a Boolean circuit, the one `compiled.py` turns into C.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from scaleyard.models.logic.conv import LogicConv2d, OrPool2d, check_tree_depth
from scaleyard.models.logic.gates import GroupSum, LogicLayer


@dataclass(frozen=True)
class LogicNetConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    thresholds: int = 3  # binary channels per input channel: pixel > (i + 1) / (thresholds + 1)
    conv_channels: tuple[int, ...] = (16, 32)  # one tree conv + 2x2 OR pool per entry
    tree_depth: int = 3
    fc: tuple[int, ...] = (2000, 2000)  # logic layers after the convs; the last feeds GroupSum
    tau: float = 10.0
    residual_init: bool = True
    connection_seed: int = 0  # the fixed random wiring (leaves and gate inputs)
    straight_through: bool = False  # training: argmax gates forward, the mixture's gradient backward


class LogicNet(nn.Module):
    def __init__(self, cfg: LogicNetConfig):
        super().__init__()
        self.cfg = cfg
        if not cfg.fc or cfg.fc[-1] % cfg.num_classes:
            raise ValueError(f"the last logic layer ({cfg.fc[-1] if cfg.fc else 0} neurons) must split into "
                             f"{cfg.num_classes} equal class groups")
        generator = torch.Generator().manual_seed(cfg.connection_seed)
        levels = torch.arange(1, cfg.thresholds + 1, dtype=torch.float32) / (cfg.thresholds + 1)
        self.register_buffer("levels", levels, persistent=False)
        channels, side = cfg.in_channels * cfg.thresholds, cfg.image_size
        convs = []
        for width in cfg.conv_channels:
            check_tree_depth(cfg.tree_depth, channels, 3)
            convs += [LogicConv2d(channels, width, cfg.tree_depth, residual_init=cfg.residual_init,
                                  generator=generator), OrPool2d(2)]
            channels, side = width, side // 2
        self.convs = nn.Sequential(*convs)
        layers, width = [], channels * side * side
        for out in cfg.fc:
            layers.append(LogicLayer(width, out, cfg.residual_init, generator))
            width = out
        self.layers = nn.Sequential(*layers)
        self.group_sum = GroupSum(cfg.num_classes, cfg.tau)
        for module in logic_modules(self):
            module.straight_through = cfg.straight_through
        self.feature_shape = (channels, side, side)  # what the first logic layer reads, flattened

    def binarize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> [B, C * thresholds, H, W] of 0.0 / 1.0 (channel c * T + i)."""
        bits = images[:, :, None] > self.levels.to(images.device)[None, None, :, None, None]
        return bits.flatten(1, 2).to(images.dtype if images.is_floating_point() else torch.float32)

    def bits_out(self, images: torch.Tensor) -> torch.Tensor:
        """The last logic layer's outputs [B, fc[-1]]."""
        x = self.convs(self.binarize(images))
        return self.layers(x.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.group_sum(self.bits_out(images))

    def class_counts(self, images: torch.Tensor) -> torch.Tensor:
        """Per-class sums before the temperature (integers when discretised)."""
        return self.group_sum.counts(self.bits_out(images))

    def gate_count(self) -> dict[str, int]:
        return gate_count(self.cfg)


def gate_count(cfg: LogicNetConfig) -> dict[str, int]:
    """Learned gates (each conv tree counted once) and gates evaluated per image (each conv tree
    once per output position), the figure the DLGN papers report."""
    learned = evaluated = 0
    side = cfg.image_size
    for width in cfg.conv_channels:
        per_layer = width * (2**cfg.tree_depth - 1)
        learned += per_layer
        evaluated += per_layer * side * side
        side //= 2
    fc = sum(cfg.fc)
    return {"learned_gates": learned + fc, "gates_per_image": evaluated + fc}


def logic_modules(net: nn.Module) -> Iterator[nn.Module]:
    return (m for m in net.modules() if isinstance(m, LogicLayer | LogicConv2d))


def set_discrete(net: nn.Module, discrete: bool) -> None:
    for module in logic_modules(net):
        module.discrete = discrete


@contextlib.contextmanager
def discretised(net: nn.Module) -> Iterator[nn.Module]:
    """Every gate its argmax inside the block (the Boolean circuit), relaxed again after."""
    before = [m.discrete for m in logic_modules(net)]
    set_discrete(net, True)
    try:
        yield net
    finally:
        for module, flag in zip(logic_modules(net), before):
            module.discrete = flag
