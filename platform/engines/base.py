"""The engine interface: how a job's parts are placed, wrapped, stepped and saved.

`single` and `ddp` are here; DeepSpeed ZeRO and megatron-core engines implement the same
methods (their sharded checkpoints behind `model_state`/`optimizer_state`), so jobs and the
Trainer never change when the engine does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaleyard.platform.distributed import DistEnv


class Engine:
    name = "single"
    # True when every rank holds the full model and optimizer state (rank 0 alone writes them);
    # sharded engines set False and every rank writes its own part.
    replicated = True

    def __init__(self, env: DistEnv, device: torch.device):
        self.env = env
        self.device = device
        self.module: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # --- set-up -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, frozen: dict[str, nn.Module]) -> nn.Module:
        self.module = model.to(self.device)
        for module in frozen.values():
            module.to(self.device).eval().requires_grad_(False)
        self.wrapped = self._wrap(self.module)
        return self.wrapped

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    # --- one step -----------------------------------------------------------------------------
    def accumulating(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context for forward+backward of one micro-batch (DDP skips the gradient all-reduce
        for all but the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Clip (max_norm 0 = no clipping), step and zero the gradients; returns the total
        gradient norm before clipping. With non-finite gradients nothing is stepped."""
        assert self.module is not None and self.optimizer is not None
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # --- collectives --------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of boolean flags over ranks: how ranks agree to checkpoint or stop."""
        values = torch.tensor([float(f) for f in flags])
        return [bool(v > 0) for v in self.all_reduce(values, "max")]

    # --- state --------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        assert self.module is not None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        assert self.module is not None
        self.module.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state)

    def parameters(self) -> Iterator[nn.Parameter]:
        assert self.module is not None
        return self.module.parameters()


class DDPEngine(Engine):
    name = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def accumulating(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        assert isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        return contextlib.nullcontext() if last_micro_batch else self.wrapped.no_sync()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        moved = tensor.to(self.device)
        if op == "mean":
            dist.all_reduce(moved, dist.ReduceOp.SUM)
            moved /= self.env.world_size
        else:
            dist.all_reduce(moved, ops[op])
        return moved.to(tensor.device)

    def barrier(self) -> None:
        dist.barrier()


ENGINES: dict[str, type[Engine]] = {"single": Engine, "ddp": DDPEngine}


def make_engine(name: str, env: DistEnv, device: torch.device) -> Engine:
    if name == "auto":
        name = "ddp" if env.distributed else "single"
    if name == "single" and env.distributed:
        raise ValueError(f"engine.name=single cannot run {env.world_size} processes; use ddp or auto")
    return ENGINES[name](env, device)
