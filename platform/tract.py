"""TrAct (Petersen et al. 2024, "TrAct: Making First-layer Pre-Activations Trainable"):
`optim.tract=true` replaces the weight gradient of the layer a job declares as its first
(`Job.first_layer`) by

    grad W  <-  G^T X (X^T X / b + lambda I)^-1  =  (plain grad W) (X^T X / b + lambda I)^-1

where X [b, n] holds the layer's input rows (a Linear's input vectors; a Conv2d's unfolded
patches, so a ViT/DiT patch embedding, a strided conv, is covered) and G [b, m] the gradient
at its outputs. This is the closed-form weight change that moves the first layer's activations
by a gradient step on the activations themselves, so a dim or low-contrast image no longer moves
the weights less than a bright one. The input and bias gradients are unchanged.

Mechanics: the layer's forward uses its weight through an identity autograd function that
holds this call's X; in backward that function receives exactly this call's plain weight
gradient and right-multiplies it by the inverse, in float32 whatever the autocast dtype. It
runs inside autograd, before the weight's gradient is accumulated, so DDP and DeepSpeed hooks
(which fire on accumulation) reduce the TrAct gradient. With several micro-batches or ranks, each
micro-batch is preconditioned by its own X (b = its rows), like per-rank batch-norm statistics:
the step is the average of per-micro-batch TrAct updates.

When b < n the Woodbury identity gives the same product through a b x b system:
    P^-1 = (1/lambda) (I - X^T (b lambda I + X X^T)^-1 X),   P = X^T X / b + lambda I.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from scaleyard.platform.config import ConfigError


def check_tract(cfg: DictConfig, job_cls: Any) -> None:
    """Before anything runs: optim.tract needs a positive lambda and a declared first layer."""
    optim = cfg.get("optim")
    if optim is None or not optim.get("tract", False):
        return
    if optim.tract_lambda <= 0:
        raise ConfigError(f"config key 'optim.tract_lambda': {optim.tract_lambda} must be > 0 with optim.tract=true "
                          "(it regularises X^T X / b, which is singular when a batch has fewer rows than inputs; "
                          "the paper's default is 0.1)")
    if job_cls.first_layer(cfg) is None:
        raise ConfigError(f"config key 'optim.tract': job {job_cls.name} declares no first layer (Job.first_layer) "
                          "for TrAct to apply to; set optim.tract=false")


def preconditioned(grad: torch.Tensor, rows: torch.Tensor, lam: float) -> torch.Tensor:
    """grad [m, n] times (X^T X / b + lam I)^-1 for X = rows [b, n], in float64 for the solve
    when inputs are float64 and float32 otherwise."""
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g, x = grad.to(dtype), rows.to(dtype)
    b, n = x.shape
    if b >= n:
        gram = x.T @ x / b + lam * torch.eye(n, dtype=dtype, device=x.device)
        # gram is symmetric positive definite: g gram^-1 = (gram^-1 g^T)^T = cholesky solve
        chol = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(g.T, chol).T.to(grad.dtype)
    small = x @ x.T + b * lam * torch.eye(b, dtype=dtype, device=x.device)
    chol = torch.linalg.cholesky(small)
    correction = torch.cholesky_solve(x @ g.T, chol).T @ x  # (g X^T) (b lam I + X X^T)^-1 X
    return ((g - correction) / lam).to(grad.dtype)


class _TrActWeight(torch.autograd.Function):
    """Identity on the weight; its backward preconditions the weight gradient with this call's X."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, rows: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.lam = lam
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        flat = grad.reshape(grad.shape[0], -1)
        return preconditioned(flat, rows, ctx.lam).reshape(grad.shape), None, None


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X: one row per output position, the inputs that position's weights multiply."""
    x = x.detach()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [B, C*k*k, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _tract_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if torch.is_grad_enabled() and weight.requires_grad:
        weight = _TrActWeight.apply(weight, input_rows(self, x), self.tract_lambda)
    if isinstance(self, nn.Linear):
        return F.linear(x, weight, self.bias)
    return self._conv_forward(x, weight, self.bias)


def attach_tract(model: nn.Module, name: str, lam: float) -> nn.Module:
    """Give `model`'s submodule `name` the TrAct weight gradient; returns that layer. Errors name
    the key and what is supported."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"config key 'optim.tract': the job's first layer {name!r} is not a submodule of its "
                          "model") from None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ConfigError(f"config key 'optim.tract': first layer {name!r} is a Conv2d with groups="
                              f"{layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r}; "
                              "TrAct supports groups=1 with numeric zero padding")
    elif not isinstance(layer, nn.Linear):
        raise ConfigError(f"config key 'optim.tract': first layer {name!r} is a {type(layer).__name__}; TrAct "
                          "supports nn.Linear and nn.Conv2d (patch embeddings included)")
    layer.tract_lambda = float(lam)
    layer.forward = types.MethodType(_tract_forward, layer)
    return layer
