"""TabDiff's per-column noise schedules (papers.md section 7).

Numerical columns: power-mean (EDM-style) noise levels
    sigma_i(t) = (smin^(1/rho_i) + t (smax^(1/rho_i) - smin^(1/rho_i)))^rho_i,  rho_i = softplus(raw_i) + 5.
Categorical columns: polynomial masking
    move_chance_j(t) = 1 - alpha_j(t) = (1 - e_max - e_min) t^(k_j) + e_min,  k_j = softplus(raw_j) + 1.
With `learnable=False` every column uses rho = 7 and k = 1 (the fixed EDM / log-linear schedules).

The reference code hits NaN/inf on these formulas (0 * log 0 in d t^k / dk at t = 0, 1/move_chance
blowing up, powers of huge rho). Here every power goes through log-space with a clamped base, rho and
k are clamped to a finite range, and the ELBO weight is written as a ratio whose numerator and
denominator are both bounded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# t^k is computed as exp(k log t) with t >= T_FLOOR, so that d/dk (t log t) is finite at t = 0.
T_FLOOR = 1e-6
# Outside these ranges the schedules are numerically degenerate; the clamp stops a runaway
# learning rate from reaching them (the gradient is then zero until the optimizer moves back).
RHO_RANGE = (1.0, 64.0)
K_RANGE = (1.0, 64.0)
RHO_FIXED = 7.0
K_FIXED = 1.0


def _raw_for(value: float, offset: float) -> float:
    """The raw parameter whose softplus(raw) + offset equals `value` (inverse softplus)."""
    excess = value - offset
    if excess <= 0:
        raise ValueError(f"initial value {value} must exceed the offset {offset}")
    return excess + math.log(-math.expm1(-excess))


class NumericalSchedule(nn.Module):
    """Noise level sigma(t) of each numerical column; t is [B, 1] (or [S, 1]) in [0, 1]."""

    def __init__(self, columns: int, learnable: bool, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho_init: float = 12.0, rho_offset: float = 5.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.columns, self.learnable = columns, learnable
        self.log_min, self.log_max, self.rho_offset = math.log(sigma_min), math.log(sigma_max), rho_offset
        if learnable:
            self.rho_raw = nn.Parameter(torch.full((columns,), _raw_for(rho_init, rho_offset)))
        else:
            self.register_buffer("rho_fixed", torch.full((columns,), RHO_FIXED), persistent=False)

    def rho(self) -> torch.Tensor:
        if not self.learnable:
            return self.rho_fixed
        return (F.softplus(self.rho_raw) + self.rho_offset).clamp(*RHO_RANGE)

    def _ends(self, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(self.log_min / rho), torch.exp(self.log_max / rho)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        rho = self.rho()
        low, high = self._ends(rho)
        base = low + t.clamp(0.0, 1.0) * (high - low)  # >= smin^(1/rho) > 0: the log is finite
        return torch.exp(rho * torch.log(base))

    def time_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The t at which each column reaches `sigma` (inverse of `sigma`)."""
        rho = self.rho()
        low, high = self._ends(rho)
        return (torch.exp(torch.log(sigma.clamp_min(1e-12)) / rho) - low) / (high - low)


class CategoricalSchedule(nn.Module):
    """Masking probability of each categorical column and the MDLM ELBO weight."""

    def __init__(self, columns: int, learnable: bool, eps_max: float = 1e-3, eps_min: float = 1e-5,
                 k_init: float = 1.0025, k_offset: float = 1.0):
        super().__init__()
        if not (0 < eps_min and 0 < eps_max and eps_min + eps_max < 1):
            raise ValueError(f"need eps_min, eps_max > 0 with sum < 1, got {eps_min}, {eps_max}")
        self.columns, self.learnable = columns, learnable
        self.eps_min, self.scale = eps_min, 1.0 - eps_max - eps_min
        self.k_offset = k_offset
        if learnable:
            self.k_raw = nn.Parameter(torch.full((columns,), _raw_for(k_init, k_offset)))
        else:
            self.register_buffer("k_fixed", torch.full((columns,), K_FIXED), persistent=False)

    def k(self) -> torch.Tensor:
        if not self.learnable:
            return self.k_fixed
        return (F.softplus(self.k_raw) + self.k_offset).clamp(*K_RANGE)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t): the probability that a value is [MASK] at time t, in [e_min, 1 - e_max]."""
        log_t = torch.log(t.clamp(T_FLOOR, 1.0))
        return self.scale * torch.exp(self.k() * log_t) + self.eps_min

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-sigma'(t) / (e^sigma(t) - 1) with sigma = -log alpha, rewritten as
        (1 - e_max - e_min) k t^(k-1) / move_chance(t): both parts stay finite for t in [0, 1]."""
        k = self.k()
        log_t = torch.log(t.clamp(T_FLOOR, 1.0))
        return self.scale * k * torch.exp((k - 1.0) * log_t) / self.move_chance(t)

