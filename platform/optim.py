"""AdamW with parameter groups, warmup + decay schedules, and an EMA of the weights."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and convolution kernels; leave biases, norms and embeddings' 1-D params."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(groups: list[dict[str, Any]], cfg: DictConfig) -> torch.optim.Optimizer:
    # foreach=False keeps the update order fixed per parameter, part of bitwise-exact resume.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def lr_factor(step: int, total: int, cfg: DictConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then
    cosine / linear decay to `min_lr_ratio`, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: DictConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def copy_for_ema(module: nn.Module) -> nn.Module:
    """A deep copy that shares the modules a job holds outside the module tree (a frozen
    encoder): those are not averaged, so copying them would only cost memory."""
    outside = {id(v): v for v in vars(module).values() if isinstance(v, nn.Module)}
    return copy.deepcopy(module, memo=outside)


class EMA:
    """Exponential moving average of a module's parameters and buffers (kept in fp32)."""

    sharded = False  # True when each rank holds only its part (saved per rank)

    def __init__(self, module: nn.Module, decay: float, shadow: nn.Module | None = None):
        """`shadow`: a prepared copy (engines whose layers cannot be deep-copied make their own)."""
        self.decay = decay
        if shadow is None:
            # fp32 even when the engine keeps bf16 weights (DeepSpeed bf16): an average with weight
            # 1e-3 in bf16 would round most updates away; float64 buffers stay float64
            shadow = copy_for_ema(module)
            for tensor in [*shadow.parameters(), *shadow.buffers()]:
                if tensor.dtype in (torch.bfloat16, torch.float16):
                    tensor.data = tensor.data.float()
        self.shadow = shadow.eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Warm-up of the decay, (1 + step) / (10 + step) capped at `decay`: without it a short
        run's EMA is mostly its random initialisation."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        for ema_param, param in zip(self.shadow.parameters(), module.parameters()):
            ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - decay)
        for ema_buf, buf in zip(self.shadow.buffers(), module.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # tensors only: megatron layers add a `_extra_state` entry that is None
        return {k: v.detach().cpu() for k, v in self.shadow.state_dict().items() if isinstance(v, torch.Tensor)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)
