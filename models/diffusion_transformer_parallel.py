"""Tensor parallelism for DiT / U-ViT, applied from outside the single-device model (the way
torchtitan's `parallelize_*` functions sit beside their models).

Megatron's split of a transformer block: the fused q/k/v (or q and k/v) and the first MLP layer
become column-parallel (each rank computes heads/tp heads and hidden/tp MLP units, no
communication in forward), the attention output and second MLP layer become row-parallel (one
all-reduce each in forward); DiT's adaLN modulation is column-parallel with its output gathered.
Weights are sliced from the single-device model, so a parallelized model computes exactly what
the original computes (tests/test_engines_megatron.py checks outputs and gradients).

megatron-core's parallel linears run on CPU (gloo) and GPU. GPU-only parts are not used here:
sequence parallelism inside blocks needs TE/apex norms, the distributed optimizer and megatron's
grad clipping need CUDA tensors; data parallelism and clipping come from the platform instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleyard.models.diffusion_transformer import DiTBlock
from scaleyard.models.transformer import MLP, Attention


@dataclass(frozen=True)
class Sharding:
    """How a parameter is split over tensor-parallel ranks: along `dim`, with `parts` fused
    blocks (q|k|v = 3) each split separately so that every rank holds matching slices."""

    dim: int
    parts: int = 1


def shard(full: torch.Tensor, how: Sharding, rank: int, size: int) -> torch.Tensor:
    pieces = full.chunk(how.parts, dim=how.dim)
    return torch.cat([piece.chunk(size, dim=how.dim)[rank] for piece in pieces], dim=how.dim).contiguous()


def unshard(shards: list[torch.Tensor], how: Sharding) -> torch.Tensor:
    """Inverse of `shard` given every rank's slice in rank order."""
    per_rank = [s.chunk(how.parts, dim=how.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=how.dim) for i in range(how.parts)], dim=how.dim)


class _GatherLastDim(torch.autograd.Function):
    """All-gather a column-parallel output along its last dimension; backward keeps this rank's
    slice. megatron's own gather allocates on `torch.cuda.current_device()`, so it cannot run on
    CPU; this one runs on any device and backend."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        pieces = [torch.empty_like(local) for _ in range(ctx.size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def _cpu_autocast_off(x: torch.Tensor):
    """megatron's linear declares its backward for CUDA autocast only; under CPU autocast the
    backward would mix bf16 gradients with fp32 weights. On CPU these layers run in the weights'
    dtype instead (CPU runs are for development; GPU runs keep autocast)."""
    import contextlib

    return torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext()


def _megatron_config(tp_size: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    # weights are copied from the single-device model, so megatron must not initialise them
    # (which would also need its CUDA RNG tracker)
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype)


def _parallel_linear(linear: nn.Linear, kind: str, parts: int, tp_size: int, rank: int,
                     gather_output: bool = False) -> tuple[nn.Module, dict[str, Sharding]]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # megatron returns (output, bias)
            with _cpu_autocast_off(x):
                out = super().forward(x.to(self.weight.dtype) if x.device.type == "cpu" else x)[0]
            return _GatherLastDim.apply(out, self.tp_group) if gather_output else out

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with _cpu_autocast_off(x):
                return super().forward(x.to(self.weight.dtype) if x.device.type == "cpu" else x)[0]

    config = _megatron_config(tp_size, linear.weight.dtype)
    out_features, in_features = linear.weight.shape
    no_init = lambda weight: None  # noqa: E731
    if kind == "column":
        layer = Column(in_features, out_features, config=config, init_method=no_init, bias=linear.bias is not None,
                       gather_output=False)
        plan = {"weight": Sharding(0, parts), "bias": Sharding(0, parts)}
    else:
        layer = Row(in_features, out_features, config=config, init_method=no_init, bias=linear.bias is not None,
                    input_is_parallel=True, skip_bias_add=False)
        plan = {"weight": Sharding(1)}  # the bias is added once, after the all-reduce
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            full = getattr(linear, name)
            param.copy_(shard(full, plan[name], rank, tp_size) if name in plan else full)
    layer.to(linear.weight.device)
    return layer, {k: v for k, v in plan.items() if getattr(linear, k, None) is not None}


def parallelize_diffusion_transformer(model: nn.Module, tp_size: int) -> dict[str, Sharding]:
    """Replace the block linears of a DiT / U-ViT in place with megatron-core parallel layers.
    Needs megatron's model-parallel groups (`parallel_state.initialize_model_parallel`). Returns
    the sharding of every split parameter, by its name in `model.state_dict()`."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    layout: dict[str, Sharding] = {}

    def replace(owner: nn.Module, prefix: str, attr: str, kind: str, parts: int = 1, gather: bool = False) -> None:
        layer, plan = _parallel_linear(getattr(owner, attr), kind, parts, tp_size, rank, gather)
        setattr(owner, attr, layer)
        layout.update({f"{prefix}{attr}.{k}": v for k, v in plan.items()})

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Attention):
            if module.heads % tp_size:
                raise ValueError(f"{name}: {module.heads} heads do not split over tensor-parallel size {tp_size}")
            if module.cross:
                replace(module, prefix, "q", "column")
                replace(module, prefix, "kv", "column", parts=2)
            else:
                replace(module, prefix, "qkv", "column", parts=3)
            replace(module, prefix, "proj", "row")
            module.heads //= tp_size
        elif isinstance(module, MLP):
            replace(module, prefix, "fc1", "column")
            replace(module, prefix, "fc2", "row")
        elif isinstance(module, DiTBlock):
            replace(module.ada, f"{prefix}ada.", "1", "column", gather=True)
    return layout
