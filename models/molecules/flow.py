"""TFG-Flow's multimodal flow: coordinates by flow matching from centre-of-mass-free Gaussian
noise, atom types by a masking CTMC, each with its own time; Euler sampling with optional
training-free guidance (`guidance.py`).

Time runs from 0 (noise / all MASK) to 1 (data). x_t = t x1 + (1 - t) x0; an atom is MASK with
probability 1 - t. Sampling: velocity (x1_hat - x_t) / (1 - t); a masked atom unmasks at rate
1 / (1 - t) to a type drawn from the predicted softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from scaleyard.models.molecules.egnn import remove_centre

if TYPE_CHECKING:
    from scaleyard.models.molecules.guidance import Guide


def centred_noise(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise on real atoms, projected to zero centre of mass, [B, N, 3]."""
    noise = torch.randn(*mask.shape, 3, generator=generator, device=mask.device)
    return remove_centre(noise, mask)


def flow_loss(model: nn.Module, num_types: int, x1: torch.Tensor, a1: torch.Tensor, mask: torch.Tensor,
              type_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Coordinate MSE on x1_hat plus cross-entropy on the masked atoms' types, independent times.
    Draws from the global torch RNG (which the platform saves, so resume is exact)."""
    b, n = a1.shape
    x1 = remove_centre(x1, mask)
    t_x, t_a = torch.rand(b, device=x1.device), torch.rand(b, device=x1.device)
    x0 = centred_noise(mask)
    x_t = t_x[:, None, None] * x1 + (1 - t_x[:, None, None]) * x0
    masked = (torch.rand(b, n, device=x1.device) >= t_a[:, None]) & mask
    a_t = torch.where(masked, torch.full_like(a1, num_types), a1)
    x1_hat, logits = model(x_t, a_t, t_x, t_a, mask)
    atoms = mask.sum().clamp(min=1)
    mse = (((x1_hat - x1) ** 2).sum(-1) * mask).sum() / atoms
    ce = (F.cross_entropy(logits.transpose(1, 2), a1, reduction="none") * masked).sum() / atoms
    loss = mse + type_weight * ce
    return loss, {"coord_mse": mse.detach(), "type_ce": ce.detach()}


@dataclass
class SamplerConfig:
    steps: int = 100


def draw_types(logits: torch.Tensor, a_t: torch.Tensor, count: int, generator: torch.Generator | None,
               num_types: int) -> torch.Tensor:
    """`count` draws of a1 ~ p(a1 | G_t), [count, B, N]: masked atoms from the softmax, the others
    keep their (already final) type."""
    probs = logits.float().softmax(-1)  # [B, N, T]
    flat = probs.reshape(-1, num_types)
    draws = torch.multinomial(flat, count, replacement=True, generator=generator)  # [B*N, count]
    draws = draws.T.reshape(count, *a_t.shape)
    unmasked = a_t != num_types
    return torch.where(unmasked[None], a_t[None], draws)


def masks_for(n_atoms: torch.Tensor) -> torch.Tensor:
    width = int(n_atoms.max())
    return torch.arange(width, device=n_atoms.device)[None] < n_atoms[:, None]


def sample(model: nn.Module, n_atoms: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator,
           guide: Guide | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler sampling of molecules with the given atom counts: (positions [B, N, 3], types [B, N],
    mask [B, N]). With `guide`, each step is steered by training-free guidance."""
    num_types = model.cfg.num_types
    mask = masks_for(n_atoms)
    x = centred_noise(mask, generator)
    a = torch.full(mask.shape, num_types, dtype=torch.long, device=mask.device)
    b = len(n_atoms)
    for i in range(sampler.steps):
        t, dt = i / sampler.steps, 1.0 / sampler.steps
        t_vec = torch.full((b,), t, device=x.device)
        with torch.no_grad():
            x1_hat, logits = model(x, a, t_vec, t_vec, mask)
        if guide is None:
            a1 = draw_types(logits, a, 1, generator, num_types)[0]
        else:
            x, x1_hat, a1 = guide.step(model, x, a, t_vec, x1_hat, logits, mask, generator)
        x = x + dt * (x1_hat - x) / (1 - t)
        x = remove_centre(x, mask)  # exact in theory; removes float drift
        jump = (torch.rand(mask.shape, generator=generator, device=x.device) < dt / (1 - t)) & (a == num_types) & mask
        a = torch.where(jump, a1, a)
    a = torch.where(mask, a, torch.zeros_like(a))
    return x.detach(), a, mask
