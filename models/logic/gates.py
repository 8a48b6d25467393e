"""Differentiable two-input logic gates (difflogic, Petersen et al. 2022), in coefficient form.

Every one of the 16 Boolean functions of two inputs, relaxed to real inputs a, b in [0, 1] by
probabilistic logic, is an affine function of (1, a, b, ab): AND = ab, OR = a + b - ab,
XOR = a + b - 2ab, NAND = 1 - ab, and so on. A neuron holds logits over the 16 gates; its relaxed
output is the softmax-weighted mixture of the 16 gates, which is therefore

    c0 + c1 a + c2 b + c3 ab,   with  c = softmax(logits) @ GATE_COEFFS   (4 numbers per neuron).

So we mix 4 coefficients per neuron once per step instead of evaluating all 16 gates per sample
(the reference implementation's layout, 16x the activation memory of a forward pass). The
discretised network uses the argmax gate: the same formula with a one-hot row of GATE_COEFFS,
exact on {0, 1} inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Gate order of difflogic: index -> (name, coefficients of 1, a, b, ab)
GATES: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("false", (0, 0, 0, 0)),
    ("a_and_b", (0, 0, 0, 1)),
    ("a_and_not_b", (0, 1, 0, -1)),
    ("a", (0, 1, 0, 0)),
    ("not_a_and_b", (0, 0, 1, -1)),
    ("b", (0, 0, 1, 0)),
    ("a_xor_b", (0, 1, 1, -2)),
    ("a_or_b", (0, 1, 1, -1)),
    ("a_nor_b", (1, -1, -1, 1)),
    ("a_xnor_b", (1, -1, -1, 2)),
    ("not_b", (1, 0, -1, 0)),
    ("a_or_not_b", (1, 0, -1, 1)),
    ("not_a", (1, -1, 0, 0)),
    ("not_a_or_b", (1, -1, 0, 1)),
    ("a_nand_b", (1, 0, 0, -1)),
    ("true", (1, 0, 0, 0)),
)
GATE_NAMES = tuple(name for name, _ in GATES)
PASS_THROUGH = 3  # gate "a": residual initialisation puts most of the mass here
NUM_GATES = 16


def gate_coefficients(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """[16, 4]: row g holds gate g's coefficients of (1, a, b, ab)."""
    return torch.tensor([c for _, c in GATES], dtype=dtype, device=device)


def init_gate_logits(shape: tuple[int, ...], residual: bool, pass_through_mass: float = 0.9) -> torch.Tensor:
    """Logits [..., 16]. Residual initialisation (convolutional DLGN paper): `pass_through_mass`
    of the softmax on gate "a", so a deep stack starts as (mostly) wires and gradients reach the
    early layers; otherwise standard normal logits as in difflogic."""
    if not residual:
        return torch.randn(*shape, NUM_GATES)
    # softmax(l)[a] = e^l / (e^l + 15) = m  =>  l = log(15 m / (1 - m))
    logits = torch.zeros(*shape, NUM_GATES)
    logits[..., PASS_THROUGH] = math.log(15 * pass_through_mass / (1 - pass_through_mass))
    return logits


def mixed_coefficients(logits: torch.Tensor, discrete: bool, straight_through: bool = False) -> torch.Tensor:
    """[..., 4] coefficients of each neuron: softmax mixture (relaxed) or the argmax gate's row.
    `straight_through`: the argmax gate's value with the mixture's gradient, so training sees
    the discretised network (the relaxed one can rely on the small mass off each argmax, summed
    over a class's many neurons, which discretising removes)."""
    table = gate_coefficients(logits.dtype, logits.device)
    if discrete:
        return table[logits.argmax(-1)]
    soft = torch.softmax(logits, dim=-1) @ table
    if straight_through:
        return table[logits.argmax(-1)] + (soft - soft.detach())
    return soft


def apply_gates(a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """c0 + c1 a + c2 b + c3 ab, with `coeffs` [..., 4] broadcasting against a and b on the
    leading dims (callers shape it [neurons, 1] or similar)."""
    c0, c1, c2, c3 = coeffs.unbind(-1)
    # a (c1 + c3 b) + (c0 + c2 b): two products and three sums per element
    return a * (c1 + c3 * b) + (c0 + c2 * b)


def random_pairs(in_dim: int, out_dim: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed input indices per neuron, drawn from concatenated random permutations so every
    input feeds about equally many neurons (none is left unused while inputs <= 2 x neurons);
    a neuron whose two inputs coincide gets its second input moved to the next one."""
    need = 2 * out_dim
    perms = [torch.randperm(in_dim, generator=generator) for _ in range(math.ceil(need / in_dim))]
    picks = torch.cat(perms)[:need]
    order = torch.randperm(need, generator=generator)
    a, b = picks[order[:out_dim]], picks[order[out_dim:]]
    if in_dim > 1:
        b = torch.where(a == b, (b + 1) % in_dim, b)
    return a, b


class LogicLayer(nn.Module):
    """`out_dim` neurons, each a learned gate over two fixed random inputs of [batch, in_dim]."""

    def __init__(self, in_dim: int, out_dim: int, residual_init: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        a, b = random_pairs(in_dim, out_dim, generator)
        # buffers: part of the state dict (the wiring is the architecture) but never trained
        self.register_buffer("idx_a", a)
        self.register_buffer("idx_b", b)
        self.logits = nn.Parameter(init_gate_logits((out_dim,), residual_init))
        self.discrete = False
        self.straight_through = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"LogicLayer expects {self.in_dim} inputs per sample, got shape {tuple(x.shape)}")
        coeffs = mixed_coefficients(self.logits, self.discrete, self.straight_through and self.training)
        return apply_gates(x[..., self.idx_a], x[..., self.idx_b], coeffs)

    def gates(self) -> torch.Tensor:
        """The argmax gate of each neuron (what the discretised and compiled networks run)."""
        return self.logits.argmax(-1)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}"


class GroupSum(nn.Module):
    """Class scores: the outputs split into `classes` equal groups, each summed, divided by tau
    (the temperature that sets how sharp the softmax of the cross-entropy is)."""

    def __init__(self, classes: int, tau: float):
        super().__init__()
        self.classes, self.tau = classes, tau

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.classes:
            raise ValueError(f"GroupSum: {x.shape[-1]} outputs do not split into {self.classes} equal groups")
        return x.reshape(*x.shape[:-1], self.classes, x.shape[-1] // self.classes).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.counts(x) / self.tau

    def extra_repr(self) -> str:
        return f"classes={self.classes}, tau={self.tau}"
