"""User-conditioned Diffusion-DPO (Wallace et al. 2023; SalesforceAIResearch/DiffusionDPO).

Winner w and loser l of a pair are noised with the same t and the same noise. With per-sample
errors L(x) = mean_CHW (prediction - target)^2 of the policy (user-conditioned) and of the frozen
reference (the base model):

    d_policy = L_policy(w) - L_policy(l),   d_ref = L_ref(w) - L_ref(l)
    inside   = -0.5 * beta * (d_policy - d_ref)
    loss     = -log sigmoid(inside), averaged over pairs

The log-sigmoid is applied per pair, then averaged (applying it to a batch mean is the bug
reported in diffusers #6702). Lowering the policy's error on w relative to l, more than the
reference does, lowers the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_inside(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float) -> torch.Tensor:
    """The logit per pair ([B]): positive when the policy prefers w more than the reference does."""
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


def diffusion_dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, inside [B])."""
    inside = dpo_inside(policy_w, policy_l, ref_w, ref_l, beta)
    return -F.logsigmoid(inside).mean(), inside
