"""Training-free guidance for the multimodal flow (TFG-Flow, Lin et al. 2025).

Per Euler step, for a target property value c and a differentiable predictor f (normalised units):
- discrete part: K candidates a1^(k) ~ p(a1 | G_t), loss_k = (f(x1_hat, a1^(k)) - c)^2, weights
  softmax(-loss / tau); the guided rate is sum_k w_k R(a_t -> b | a1^(k)); one a1* ~ Cat(w) is kept
  (it carries the step's jumps and the continuous guidance);
- continuous part: `x_steps` gradient steps on x_t through the flow model (rho), then, with x1_hat
  recomputed at the moved x_t, `x1_steps` steps on x1_hat (mu); every gradient is projected to
  zero centre of mass and clipped to norm `clip` per molecule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleyard.models.molecules.egnn import PropertyNet, remove_centre
from scaleyard.models.molecules.flow import draw_types


@dataclass
class GuidanceConfig:
    candidates: int = 16  # K (the paper: 512)
    tau: float = 0.05  # softmax temperature of the importance weights
    rho: float = 0.02  # step size on x_t
    mu: float = 0.02  # step size on x1_hat
    x_steps: int = 4
    x1_steps: int = 4
    clip: float = 1.0  # gradient norm bound per molecule


class Guide:
    """Steers sampling toward `target` [B] (data units) of property column `column` of `predictor`."""

    def __init__(self, predictor: PropertyNet, column: int, target: torch.Tensor, cfg: GuidanceConfig):
        self.predictor, self.column, self.cfg, self.raw_target = predictor, column, cfg, target
        self.target = (target - predictor.mean[column]) / predictor.std[column]  # normalised units

    def part(self, rows: slice) -> Guide:
        """The same guidance for a slice of the molecules (sampling in batches)."""
        return Guide(self.predictor, self.column, self.raw_target[rows], self.cfg)

    def loss(self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Per-molecule squared error in normalised units, [repeats * B] (molecules stacked `repeats` times)."""
        return (self.predictor(x, a, mask)[:, self.column] - self.target.repeat(repeats)) ** 2

    def step(self, model: nn.Module, x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, x1_hat: torch.Tensor,
             logits: torch.Tensor, mask: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Guided (x_t, x1_hat, a1*) of one step."""
        cfg, num_types = self.cfg, model.cfg.num_types
        k, b = cfg.candidates, len(a)
        candidates = draw_types(logits, a, k, generator, num_types)  # [K, B, N]
        with torch.no_grad():
            losses = self.loss(x1_hat.repeat(k, 1, 1), candidates.reshape(k * b, -1), mask.repeat(k, 1),
                               repeats=k).view(k, b)
        weights = torch.softmax(-losses / cfg.tau, dim=0)  # [K, B]
        pick = (torch.multinomial(weights.T, 1, generator=generator)[:, 0] if k > 1
                else torch.zeros(b, dtype=torch.long, device=a.device))  # K = 1: no draw, the unguided sampler's RNG
        a1 = candidates[pick, torch.arange(b, device=a.device)]
        if cfg.x_steps:
            for _ in range(cfg.x_steps):
                x = x - cfg.rho * self._gradient(lambda z: model(z, a, t, t, mask)[0], x, a1, mask)
            with torch.no_grad():  # x1_hat at the moved x_t (never the stale one)
                x1_hat, _ = model(x, a, t, t, mask)
        for _ in range(cfg.x1_steps):
            x1_hat = x1_hat - cfg.mu * self._gradient(lambda z: z, x1_hat, a1, mask)
        return x.detach(), x1_hat.detach(), a1

    def _gradient(self, to_clean, z: torch.Tensor, a1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            loss = self.loss(to_clean(z), a1, mask).sum()
            (grad,) = torch.autograd.grad(loss, z)
        grad = remove_centre(grad, mask)
        norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
        return grad * (self.cfg.clip / norm).clamp(max=1.0)
