"""EGNN with attention (Satorras et al. 2021; the variant of EDM / TFG-Flow), for flow and regressor heads.

Molecules are padded to a common width: `mask` [B, N] marks real atoms; padding atoms carry zeros,
take part in no edge and never move. Coordinate updates are sums of relative vectors scaled by
invariant edge weights, so the network is E(3)-equivariant in `x` and permutation-equivariant in atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 2},  # tests: seconds on a CPU
    "cpu_small": {"hidden": 64, "layers": 4},  # trains in minutes on 2 CPU cores
    "paper": {"hidden": 256, "layers": 9},  # TFG-Flow's network (9 layers x 256), for GPUs
}


@dataclass
class EGNNConfig:
    num_types: int = 4  # atom classes (QM9 heavy atoms: C, N, O, F)
    hidden: int = 64
    layers: int = 4
    attention: bool = True
    coord_range: float = 15.0  # tanh bound of one edge's coordinate update (EDM's stabiliser)
    norm_constant: float = 1.0  # added to the distance in the coordinate update's denominator


def edge_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, N, N]: both ends real atoms, no self-edges."""
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & ~eye


def centre(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centre of mass (unit masses) of the real atoms, [B, 1, 3]."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)


def remove_centre(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Projection onto the centre-of-mass-free subspace; padding stays zero."""
    return (x - centre(x, mask)) * mask[..., None].to(x.dtype)


class EquivariantBlock(nn.Module):
    """One message-passing layer: attention-gated messages update features; the same messages
    weight relative position vectors to update coordinates."""

    def __init__(self, cfg: EGNNConfig):
        super().__init__()
        h = cfg.hidden
        self.edge_mlp = nn.Sequential(nn.Linear(2 * h + 2, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        self.attention = nn.Sequential(nn.Linear(h, 1), nn.Sigmoid()) if cfg.attention else None
        self.node_mlp = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, h))
        last = nn.Linear(h, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # start near the identity map on coordinates
        self.coord_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), last)
        self.norm = nn.LayerNorm(h)
        self.coord_range, self.norm_constant = cfg.coord_range, cfg.norm_constant

    def forward(self, h: torch.Tensor, x: torch.Tensor, edges: torch.Tensor, mask: torch.Tensor,
                d2_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[1]
        diff = x[:, :, None] - x[:, None, :]  # [B, N, N, 3]
        d2 = (diff**2).sum(-1, keepdim=True)
        pair = torch.cat([h[:, :, None].expand(-1, -1, n, -1), h[:, None].expand(-1, n, -1, -1), d2, d2_input], -1)
        m = self.edge_mlp(pair)
        if self.attention is not None:
            m = m * self.attention(m)
        e = edges[..., None].to(h.dtype)
        m = m * e
        neighbours = e.sum(2).clamp(min=1)  # mean aggregation: molecules of any size see the same scale
        h = h + self.node_mlp(torch.cat([self.norm(h), m.sum(2) / neighbours], -1))
        h = h * mask[..., None].to(h.dtype)
        # sqrt(d2 + eps): no NaN gradient at coinciding atoms (padding, or a collapsed sample)
        unit = diff / ((d2 + 1e-8).sqrt() + self.norm_constant)
        step = unit * torch.tanh(self.coord_mlp(m)) * self.coord_range * e
        x = x + step.sum(2) / neighbours
        return h, x * mask[..., None].to(x.dtype)


class EGNN(nn.Module):
    """Embeds per-atom inputs, runs the blocks; returns final features and coordinates."""

    def __init__(self, cfg: EGNNConfig, inputs: int):
        super().__init__()
        self.embed = nn.Linear(inputs, cfg.hidden)
        self.blocks = nn.ModuleList(EquivariantBlock(cfg) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.hidden)

    def forward(self, features: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edges = edge_mask(mask)
        h = self.embed(features) * mask[..., None].to(features.dtype)
        d2_input = ((x[:, :, None] - x[:, None, :]) ** 2).sum(-1, keepdim=True)
        for block in self.blocks:
            h, x = block(h, x, edges, mask, d2_input)
        return self.out_norm(h), x


class MoleculeFlowNet(nn.Module):
    """TFG-Flow's denoiser: (x_t, a_t, t_x, t_a) -> (clean coordinates x1_hat, atom-type logits).

    `a` holds class indices in [0, num_types], where num_types is MASK. The coordinate output keeps
    the input's centre of mass, so it is translation-equivariant (and centre-free for centre-free input).
    """

    def __init__(self, cfg: EGNNConfig):
        super().__init__()
        self.cfg = cfg
        self.egnn = EGNN(cfg, cfg.num_types + 1 + 2)
        h = cfg.hidden
        self.type_head = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, cfg.num_types))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.egnn.blocks

    def forward(self, x: torch.Tensor, a: torch.Tensor, t_x: torch.Tensor, t_a: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = a.shape
        times = torch.stack([t_x, t_a], -1).to(x.dtype)[:, None].expand(b, n, 2)
        features = torch.cat([F.one_hot(a, self.cfg.num_types + 1).to(x.dtype), times], -1)
        h, out = self.egnn(features, x, mask)
        x1_hat = remove_centre(out, mask) + centre(x, mask) * mask[..., None].to(x.dtype)
        return x1_hat, self.type_head(h)


class PropertyNet(nn.Module):
    """The same network family as an invariant regressor: (x, atom types) -> properties [B, P],
    normalised by the training split's mean and std (kept as buffers, so they travel with the weights)."""

    def __init__(self, cfg: EGNNConfig, outputs: int):
        super().__init__()
        self.cfg = cfg
        self.egnn = EGNN(cfg, cfg.num_types)
        self.node_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.graph_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, outputs))
        self.register_buffer("mean", torch.zeros(outputs))
        self.register_buffer("std", torch.ones(outputs))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.egnn.blocks

    def forward(self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised predictions [B, P]."""
        features = F.one_hot(a, self.cfg.num_types).to(x.dtype)
        h, _ = self.egnn(features, x, mask)
        pooled = (self.node_head(h) * mask[..., None].to(h.dtype)).sum(1)
        return self.graph_head(pooled)

    def predict(self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predictions in the data's units [B, P]."""
        return self(x, a, mask) * self.std + self.mean


def egnn_flops_per_sample(cfg: EGNNConfig, atoms: int) -> float:
    """Forward + backward matmul FLOPs of one molecule of `atoms` atoms (edge MLPs dominate)."""
    h = cfg.hidden
    edge = 2 * atoms * atoms * ((2 * h + 2) * h + h * h + h + h * h + h)  # edge, attention and coordinate MLPs
    node = 2 * atoms * (2 * h * h + h * h)
    return 3.0 * cfg.layers * (edge + node)
