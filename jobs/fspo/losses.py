"""Preference losses on summed completion log-probabilities (FSPO: SFT, then IPO; DPO optional).

h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
IPO (Azar et al. 2023, the FSPO paper's default): (h - 1 / (2 beta))^2
DPO (Rafailov et al. 2023): -log sigmoid(beta h)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_KINDS = ("ipo", "dpo")


def log_ratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor) -> torch.Tensor:
    """h per example ([B])."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def preference_loss(kind: str, beta: float, h: torch.Tensor) -> torch.Tensor:
    """Per-example loss ([B]) of the margins `h`."""
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if kind == "dpo":
        return -F.logsigmoid(beta * h)
    raise ValueError(f"loss.kind {kind!r}: choose one of {', '.join(PREFERENCE_KINDS)}")


def sft_loss(chosen_logp: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per completion token over the batch (scalar)."""
    return -chosen_logp.sum() / chosen_tokens.sum().clamp(min=1)
