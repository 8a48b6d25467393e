"""A small equivariant GNN (EGNN-style message passing over all atom pairs) whose repeated layers
sit in `convs`, which the activation-checkpointing name rule does not find, so a job declares
them (`JobParts.blocks`).

Run as a script (one process; gloo): every engine wraps it with
train.activation_checkpointing=true and the declared blocks, and reports how many modules it
wrapped and the largest gradient difference to the plain model, as JSON on stdout.
`python tests/engine_jobs/checkpointing_probe.py`
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn


class EGNNLayer(nn.Module):
    """Messages from pairs (features, squared distance) update features and, equivariantly,
    coordinates."""

    def __init__(self, width: int):
        super().__init__()
        self.edge = nn.Sequential(nn.Linear(2 * width + 1, width), nn.SiLU(), nn.Linear(width, width))
        self.node = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.coord = nn.Linear(width, 1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        diff = x[:, None] - x[None]
        pairs = torch.cat([h[:, None].expand(n, n, -1), h[None].expand(n, n, -1), diff.pow(2).sum(-1, keepdim=True)],
                          dim=-1)
        messages = self.edge(pairs)
        x = x + (diff * self.coord(messages)).mean(1)
        return h + self.node(torch.cat([h, messages.sum(1)], dim=-1)), x


class TinyEGNN(nn.Module):
    def __init__(self, atom_types: int = 5, width: int = 32, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(atom_types, width)
        self.convs = nn.ModuleList(EGNNLayer(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, atoms: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(atoms)
        for conv in self.convs:
            h, x = conv(h, x)
        return self.out(h).sum() + x.pow(2).sum()


def declared_blocks(model: nn.Module) -> list[nn.Module]:
    """What the GNN's job returns as JobParts.blocks."""
    return list(model.convs)


def inputs(atoms: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.one_hot(torch.randint(0, 5, (atoms,), generator=g), 5).float(), \
        torch.randn(atoms, 3, generator=g)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    model(*inputs()).backward()
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from scaleyard.platform.config import TrainingConfig, resolve
    from scaleyard.platform.distributed import DistEnv
    from scaleyard.platform.engines import engine_class

    torch.manual_seed(0)
    reference = TinyEGNN()
    expected = gradients(copy.deepcopy(reference))
    plan = {"modules": {"convs.*.edge.0": "colwise", "convs.*.edge.2": "rowwise"}}  # megatron needs one
    report = {}
    for name in ("single", "ddp", "deepspeed", "megatron"):
        cfg = resolve(TrainingConfig, [], [f"engine.name={name}", "train.activation_checkpointing=true",
                                           "engine.zero_stage=0"])
        engine = engine_class(name)(DistEnv(), torch.device("cpu"), cfg)
        model = TinyEGNN()
        model.load_state_dict(reference.state_dict())
        engine.wrap(model, {}, tp_plan=plan, blocks=declared_blocks)
        got = gradients(engine.module)
        report[name] = {"wrapped": sum(isinstance(m, CheckpointWrapper) for m in engine.module.modules()),
                        "wrapped_convs": all(isinstance(c, CheckpointWrapper) for c in engine.module.convs),
                        "grad_difference": max(float((got[k] - expected[k]).abs().max()) for k in expected)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
