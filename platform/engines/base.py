"""The engine interface: how a job's parts are placed, wrapped, stepped and saved.

`single` and `ddp` are here; DeepSpeed ZeRO and megatron-core engines implement the same
methods (their sharded checkpoints behind `model_state`/`optimizer_state`), so jobs and the
Trainer never change when the engine does.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from scaleyard.platform.config import ConfigError
from scaleyard.platform.distributed import DistEnv, init_process_group
from scaleyard.platform.engines.activation_checkpointing import apply_activation_checkpointing
from scaleyard.platform.optim import EMA

Blocks = Callable[[nn.Module], list[nn.Module]]  # JobParts.blocks: the model's repeated blocks


class Engine:
    name = "single"
    # True when every rank holds the full model and optimizer state (rank 0 alone writes them);
    # sharded engines set False and every rank writes its own part (`save_state`).
    replicated = True
    # True when no rank holds the whole model (ZeRO-3, tensor parallelism): forward passes are
    # collective, so evaluation runs on every rank (rank 0 reports).
    collective_eval = False
    # True when the gradient norm is only known after the update was applied (DeepSpeed)
    steps_before_norm_check = False

    def __init__(self, env: DistEnv, device: torch.device, cfg: DictConfig):
        self.env = env
        self.device = device
        self.cfg = cfg
        self.module: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def data_rank(self) -> int:
        """This rank's place among the model replicas (what the data is split over)."""
        return self.env.rank

    @property
    def data_world_size(self) -> int:
        return self.env.world_size

    # --- set-up -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, frozen: dict[str, nn.Module], tp_plan: Any = None,
             blocks: Blocks | None = None) -> nn.Module:
        """Place the model and frozen modules. `tp_plan` (Job.tp_plan) is used by engines that
        split layers; `blocks` (JobParts.blocks) names what activation checkpointing wraps."""
        self.module = model.to(self.device)
        self.checkpoint_activations(blocks)
        for module in frozen.values():
            module.to(self.device).eval().requires_grad_(False)
        self.wrapped = self._wrap(self.module)
        return self.wrapped

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def checkpoint_activations(self, blocks: Blocks | None) -> None:
        """train.activation_checkpointing, the same for every engine: the job's declared blocks,
        else the name rule (platform/engines/activation_checkpointing.py)."""
        if self.cfg.train.activation_checkpointing:
            assert self.module is not None
            apply_activation_checkpointing(self.module, blocks)

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Entered around `Job.evaluate(model)`; engines that partition parameters may gather them."""
        return contextlib.nullcontext()

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Returns the module `train_step` calls (engines that need the optimizer to finish
        wrapping, like DeepSpeed, do it here)."""
        self.optimizer = optimizer
        return self.wrapped

    def make_ema(self, decay: float) -> EMA:
        assert self.module is not None
        return EMA(self.module, decay)

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

    def step_skipped(self) -> bool:
        """True when the last clip_and_step skipped its update on purpose (fp16 overflow)."""
        return False

    # --- collectives --------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """Release what the engine's library holds, before the process group is destroyed."""

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

    def save_state(self, folder: Path) -> None:
        """Collective: sharded engines write their model/optimizer parts into `folder`."""

    def load_state(self, folder: Path) -> None:
        """Collective: the counterpart of `save_state`."""

    def resume_folder(self, folder: Path, saved_world: int) -> Path:
        """Collective (sharded engines): the folder to load `folder`'s checkpoint from at this world
        size, `folder` itself when its layout already fits (platform/engines/reshard.py)."""
        if saved_world != self.env.world_size:
            raise RuntimeError(f"{folder} holds {self.name} shards of {saved_world} ranks and this run has "
                               f"{self.env.world_size}; this engine resumes at the same world size only")
        return folder

    def parameters(self) -> Iterator[nn.Parameter]:
        assert self.module is not None
        return self.module.parameters()


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, env: DistEnv, device: torch.device, cfg: DictConfig):
        super().__init__(env, device, cfg)
        ensure_process_group(env, cfg.engine.backend)  # also for one process (benchmarks, ddp on 1 GPU)

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


def ensure_process_group(env: DistEnv, backend: str) -> None:
    """Engines built on torch.distributed need a process group even for one process."""
    if dist.is_initialized():
        return
    if env.distributed:
        init_process_group(env, backend)
        return
    with socket.socket() as probe:  # a free loopback port for a group of one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def data_world_size(cfg: DictConfig, world_size: int) -> int:
    """Model replicas the data is split over: tensor-parallel ranks of one replica share batches."""
    return world_size // cfg.engine.tp_size if cfg.engine.name == "megatron" else world_size


def check_engine(cfg: DictConfig, world_size: int, runs_here: bool = True, job_cls: Any = None) -> None:
    """Engine settings that cannot run, reported with their key before anything starts or queues.
    `job_cls` (the Job class) lets engines check what the job declares (e.g. a tensor-parallel plan)."""
    name = cfg.engine.name
    if cfg.train.precision == "fp16" and name != "deepspeed":
        raise ConfigError("config key 'train.precision': fp16 needs loss scaling, which engine.name=deepspeed "
                          "provides; use bf16 (no loss scaling needed) or engine.name=deepspeed")
    if name == "single" and world_size > 1:
        raise ConfigError(f"config key 'engine.name': single cannot run {world_size} processes; use ddp or auto")
    if name == "deepspeed":
        from scaleyard.platform.engines.deepspeed_engine import check_deepspeed

        check_deepspeed(cfg, world_size, runs_here)
    if name == "megatron":
        from scaleyard.platform.engines.megatron_engine import check_megatron

        check_megatron(cfg, world_size, job_cls)
    elif cfg.engine.tp_size > 1 or cfg.engine.sequence_parallel:
        raise ConfigError(f"config key 'engine.tp_size': tensor/sequence parallelism needs engine.name=megatron "
                          f"(got {name})")


def engine_class(name: str) -> type[Engine]:
    if name == "deepspeed":
        from scaleyard.platform.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine
    if name == "megatron":
        from scaleyard.platform.engines.megatron_engine import MegatronEngine

        return MegatronEngine
    return {"single": Engine, "ddp": DDPEngine}[name]


def make_engine(cfg: DictConfig, env: DistEnv, device: torch.device) -> Engine:
    name = cfg.engine.name
    if name == "auto":
        name = "ddp" if env.distributed else "single"
    if name == "single" and env.distributed:
        raise ValueError(f"engine.name=single cannot run {env.world_size} processes; use ddp or auto")
    return engine_class(name)(env, device, cfg)
