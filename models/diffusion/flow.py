"""Generative processes as functions of a model: rectified-flow matching (default) and
DDPM with v-prediction (option); Euler, Heun and DDIM samplers with classifier-free guidance.

Conventions: data x0, noise e ~ N(0, I), t in [0, 1] with t = 0 data and t = 1 noise.
- flow: x_t = (1 - t) x0 + t e, the model predicts the velocity v = e - x0.
- vpred (cosine DDPM schedule, continuous t): alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2),
  x_t = alpha_t x0 + sigma_t e, the model predicts v = alpha_t e - sigma_t x0.
A model is any callable `model(x_t, t, text, text_mask)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

PROCESSES = ("flow", "vpred")
SAMPLERS = ("euler", "heun", "ddim")
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def alpha_sigma(t: torch.Tensor, process: str) -> tuple[torch.Tensor, torch.Tensor]:
    if process == "flow":
        return 1 - t, t
    return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)


def sample_timesteps(batch: int, generator: torch.Generator | None, device: torch.device,
                     logit_normal: bool = True) -> torch.Tensor:
    """Logit-normal t (SD3's choice: more weight on mid times) or uniform."""
    if logit_normal:
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    return torch.rand(batch, generator=generator, device=device)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, process: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, regression target) for a batch."""
    alpha, sigma = (v.view(-1, *[1] * (x0.dim() - 1)) for v in alpha_sigma(t, process))
    x_t = alpha * x0 + sigma * noise
    target = noise - x0 if process == "flow" else alpha * noise - sigma * x0
    return x_t, target


def training_loss(model: Denoiser, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                  t: torch.Tensor, noise: torch.Tensor, process: str = "flow") -> torch.Tensor:
    """Mean squared error of the model's prediction, per sample [B] (the caller reduces)."""
    x_t, target = noised(x0, noise, t, process)
    prediction = model(x_t, t, text, text_mask)
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


def guided(model: Denoiser, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
           null_text: torch.Tensor, null_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: u + scale * (c - u), in one batched call."""
    if scale == 1.0:
        return model(x, t, text, mask)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null_text]), torch.cat([mask, null_mask]))
    conditional, unconditional = both.chunk(2)
    return unconditional + scale * (conditional - unconditional)


def to_x0(x: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor,
          process: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 estimate, noise estimate) from a prediction at time t."""
    alpha, sigma = (v.view(-1, *[1] * (x.dim() - 1)) for v in alpha_sigma(t, process))
    if process == "flow":
        return x - sigma * prediction, x + alpha * prediction
    return alpha * x - sigma * prediction, sigma * x + alpha * prediction


def alpha_sigma_rates(t: torch.Tensor, process: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d alpha / dt and d sigma / dt."""
    if process == "flow":
        return -torch.ones_like(t), torch.ones_like(t)
    return -math.pi / 2 * torch.sin(math.pi * t / 2), math.pi / 2 * torch.cos(math.pi * t / 2)


@torch.no_grad()
def sample(model: Denoiser, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, null_text: torch.Tensor,
           null_mask: torch.Tensor, steps: int = 30, sampler: str = "euler", guidance: float = 1.0,
           process: str = "flow") -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps from t = 1 (noise)
    to t = 0. euler: first order; heun: second order (one extra evaluation per step, none on the
    last); ddim (eta = 0): x_next = alpha(t_next) x0 + sigma(t_next) eps, which for the flow
    process is the same update as euler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r}; choose one of {', '.join(PROCESSES)}")
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise

    def slope(x_now: torch.Tensor, t_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t_batch = t_now.expand(x_now.shape[0])
        x0, eps = to_x0(x_now, guided(model, x_now, t_batch, text, mask, null_text, null_mask, guidance), t_batch,
                        process)
        d_alpha, d_sigma = alpha_sigma_rates(t_now, process)
        return d_alpha * x0 + d_sigma * eps, x0, eps

    for t_now, t_next in zip(times[:-1], times[1:]):
        derivative, x0, eps = slope(x, t_now)
        if sampler == "ddim":
            alpha_next, sigma_next = alpha_sigma(t_next, process)
            x = alpha_next * x0 + sigma_next * eps
            continue
        x_next = x + (t_next - t_now) * derivative
        if sampler == "heun" and t_next > 0:
            derivative_next, _, _ = slope(x_next, t_next)
            x_next = x + (t_next - t_now) * (derivative + derivative_next) / 2
        x = x_next
    return x
