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
# prediction(x_t, t) of a model whose conditioning is already bound (see `conditioned`)
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# adjust(x0, eps, t) -> (edited x0, applied [B]): an edit of the clean estimate inside a step
Adjust = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def conditioned(model: Denoiser, text: torch.Tensor, mask: torch.Tensor, null_text: torch.Tensor,
                null_mask: torch.Tensor, guidance: float = 1.0) -> Velocity:
    """`prediction(x, t)` of a text-conditioned model under classifier-free guidance. x may hold
    several stacked copies of the batch (block-major, as SRDS stacks its blocks): the conditioning
    is tiled to match, so one call serves every block."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        copies = x.shape[0] // text.shape[0]
        if copies == 1:
            return guided(model, x, t, text, mask, null_text, null_mask, guidance)
        tile = (lambda v: v.repeat(copies, *[1] * (v.dim() - 1)))  # noqa: E731
        return guided(model, x, t, tile(text), tile(mask), tile(null_text), tile(null_mask), guidance)

    return predict


def ode_step(predict: Velocity, x: torch.Tensor, t_now: torch.Tensor, t_next: torch.Tensor, sampler: str = "euler",
             process: str = "flow", adjust: Adjust | None = None) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps from t_now to
    t_next (per-sample times, [B]). euler: first order; heun: second order (one extra evaluation,
    none where t_next = 0); ddim (eta = 0): x_next = alpha(t_next) x0 + sigma(t_next) eps, which for
    the flow process is the same update as euler.

    `adjust(x0, eps, t) -> (x0', applied)` edits the clean-image estimate where `applied` [B] holds
    (the safe denoiser); those samples are re-noised to t from (x0', eps) before the step, so the
    step continues from the edited estimate (in Heun's second evaluation the edit changes the
    slope only)."""
    view = (-1, *[1] * (x.dim() - 1))

    def slope(x_now: torch.Tensor, t: torch.Tensor, rebase: bool) -> tuple[torch.Tensor, ...]:
        x0, eps = to_x0(x_now, predict(x_now, t), t, process)
        if adjust is not None:
            edited, applied = adjust(x0, eps, t)
            if bool(applied.any()):
                x0 = torch.where(applied.view(view), edited, x0)
                if rebase:
                    alpha, sigma = (v.view(view) for v in alpha_sigma(t, process))
                    x_now = torch.where(applied.view(view), alpha * x0 + sigma * eps, x_now)
        d_alpha, d_sigma = (v.view(view) for v in alpha_sigma_rates(t, process))
        return d_alpha * x0 + d_sigma * eps, x0, eps, x_now

    derivative, x0, eps, x = slope(x, t_now, rebase=True)
    if sampler == "ddim":
        alpha_next, sigma_next = (v.view(view) for v in alpha_sigma(t_next, process))
        return alpha_next * x0 + sigma_next * eps
    dt = (t_next - t_now).view(view)
    x_next = x + dt * derivative
    if sampler == "heun":
        last = t_next == 0
        if not bool(last.all()):
            derivative_next = slope(x_next, t_next, rebase=False)[0]
            corrected = x + dt * (derivative + derivative_next) / 2
            x_next = torch.where(last.view(view), x_next, corrected)
    return x_next


def check_sampler(sampler: str, process: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r}; choose one of {', '.join(PROCESSES)}")


def time_grid(steps: int, device: torch.device | None = None) -> torch.Tensor:
    """The `steps + 1` times of a sampler, from 1 (noise) to 0 (data), evenly spaced."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def integrate(predict: Velocity, noise: torch.Tensor, steps: int = 30, sampler: str = "euler",
              process: str = "flow", adjust: Adjust | None = None) -> torch.Tensor:
    """The serial sampler: `steps` ODE steps from t = 1 (noise) to t = 0."""
    check_sampler(sampler, process)
    times = time_grid(steps, noise.device)
    x = noise
    for t_now, t_next in zip(times[:-1], times[1:]):
        x = ode_step(predict, x, t_now.expand(x.shape[0]), t_next.expand(x.shape[0]), sampler, process, adjust)
    return x


@torch.no_grad()
def sample(model: Denoiser, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, null_text: torch.Tensor,
           null_mask: torch.Tensor, steps: int = 30, sampler: str = "euler", guidance: float = 1.0,
           process: str = "flow") -> torch.Tensor:
    """Serial sampling of a text-conditioned model (see `ode_step` for the samplers)."""
    predict = conditioned(model, text, mask, null_text, null_mask, guidance)
    return integrate(predict, noise, steps, sampler, process)
