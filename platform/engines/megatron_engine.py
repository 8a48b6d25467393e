"""`engine.name=megatron`: megatron-core tensor parallelism inside each model replica, torch DDP
across replicas.

The world is split into `engine.tp_size` ranks per replica (megatron's `parallel_state` groups:
consecutive ranks share a replica, so TP stays inside a node). The job's model is built whole on
every rank, then the plan the job declares (`Job.tp_plan`, written beside the model, e.g.
`TP_PLAN` in models/diffusion/transformer.py) swaps the layers it names for megatron's parallel
ones (platform/engines/tensor_parallel.py). A job without a plan is refused at launch.
Data is split over replicas only. Checkpoints hold one file per tensor-parallel rank
(`step_*/megatron/tp_rank<R>.pt`, written by the first replica) plus the sharding layout, from
which `model_state` and `scaleyard export` rebuild the single-device weights. A checkpoint written
at another tensor-parallel (or world) size is laid out anew on load (`resume_folder`): weights,
AdamW moments (split like their parameters) and EMA slices are merged with that layout and split
for this run, in a folder beside the checkpoint (platform/engines/reshard.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from scaleyard.platform.checkpoint_integrity import safe_load
from scaleyard.platform.config import ConfigError
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.engines import reshard
from scaleyard.platform.engines.base import Blocks, DDPEngine
from scaleyard.platform.engines.tensor_parallel import Sharding, apply_tp_plan, parse_plan, shard, unshard
from scaleyard.platform.optim import EMA, copy_for_ema

FOLDER = "megatron"


def check_megatron(cfg: DictConfig, world_size: int, job_cls: Any = None) -> None:
    """Before launch: the world splits into tensor-parallel groups, and the job (when given)
    declares a plan whose numbers split over engine.tp_size."""
    tp = cfg.engine.tp_size
    if world_size % tp:
        raise ConfigError(f"config key 'engine.tp_size': {tp} does not divide the world size {world_size}")
    if cfg.engine.sequence_parallel:
        raise ConfigError("config key 'engine.sequence_parallel': sequence parallelism needs megatron's fused "
                          "norms (Transformer Engine/apex, GPU only); plans here use tensor parallelism only")
    if job_cls is not None:
        plan = job_cls.tp_plan(cfg)
        if plan is None:
            raise ConfigError(f"config key 'engine.name': job {job_cls.name}'s model has no tensor-parallel plan "
                              "(Job.tp_plan returns None); use engine.name=ddp or deepspeed, or declare a plan "
                              "beside the model")
        parse_plan(plan, f"job {job_cls.name}: Job.tp_plan").check(tp)
    # found, not imported: importing megatron-core takes about 10 s here, paid again by every rank
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ConfigError("engine.name=megatron needs megatron-core; pip install megatron-core")


class MegatronEngine(DDPEngine):
    name = "megatron"
    replicated = False
    collective_eval = True

    def __init__(self, env: DistEnv, device: torch.device, cfg: DictConfig):
        super().__init__(env, device, cfg)  # the process group
        from megatron.core import parallel_state

        self.tp_size = cfg.engine.tp_size
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp_size)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.layout: dict[str, Sharding] = {}
        self._ema_copy: nn.Module | None = None
        self._resharded: Path | None = None  # the folder `load_state` is about to read, when laid out anew

    @property
    def data_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def data_world_size(self) -> int:
        return self.env.world_size // self.tp_size

    def wrap(self, model: nn.Module, frozen: dict[str, nn.Module], tp_plan: Any = None,
             blocks: Blocks | None = None) -> nn.Module:
        if tp_plan is None:  # launch refuses this already; a direct caller gets the same words
            raise ConfigError("config key 'engine.name': this job's model has no tensor-parallel plan "
                              "(Job.tp_plan returns None); use engine.name=ddp or deepspeed")
        plan = parse_plan(tp_plan)
        model = model.to(self.device)
        if self.cfg.train.ema_decay > 0:  # parallelized like the model (megatron layers cannot be deep-copied)
            self._ema_copy = copy_for_ema(model)
            apply_tp_plan(self._ema_copy, plan, self.tp_size)
        self.layout = apply_tp_plan(model, plan, self.tp_size)
        self.module = model
        self.checkpoint_activations(blocks)  # after the split: the blocks hold the parallel layers
        for module in frozen.values():
            module.to(self.device).eval().requires_grad_(False)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=self.dp_group)
        return self.wrapped

    def make_ema(self, decay: float) -> EMA:
        ema = EMA(self.module, decay, shadow=self._ema_copy)
        ema.sharded = True  # each rank averages its own slices; saved per rank
        self._ema_copy = None
        return ema

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over split and replicated parameters (megatron's own clipping
        asserts CUDA tensors): split slices are summed over the tensor-parallel group, replicated
        parameters counted once."""
        assert self.module is not None and self.optimizer is not None
        split, replicated = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        params = [p for p in self.module.parameters() if p.grad is not None]
        for p in params:
            square = p.grad.detach().float().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += square
            else:
                replicated += square
        dist.all_reduce(split, group=self.tp_group)
        norm = (split + replicated).sqrt()
        if torch.isfinite(norm):
            if max_norm > 0:
                factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.detach().mul_(factor)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.cpu()

    def accumulating(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_batch else self.wrapped.no_sync()

    # --- state --------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """Single-device weights, gathered over the tensor-parallel group (collective)."""
        return gather_full_state(self.module, self.layout, self.tp_group, self.tp_size)

    def save_state(self, folder: Path) -> None:
        from megatron.core import parallel_state

        if parallel_state.get_data_parallel_rank() == 0:  # replicas hold identical shards
            (folder / FOLDER).mkdir(exist_ok=True)
            torch.save({"model": _local_state(self.module), "optimizer": self.optimizer.state_dict(),
                        "layout": {k: [v.dim, v.parts] for k, v in self.layout.items()}, "tp_size": self.tp_size,
                        "optimizer_names": self._optimizer_names()},
                       folder / FOLDER / f"tp_rank{self.tp_rank}.pt")

    def load_state(self, folder: Path) -> None:
        state = safe_load(folder / FOLDER / f"tp_rank{self.tp_rank}.pt", map_location=self.device)
        if state["tp_size"] != self.tp_size:
            raise RuntimeError(f"{folder} was written with engine.tp_size={state['tp_size']}; this run has "
                               f"{self.tp_size} (export it with `scaleyard export` and start a new run)")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if folder == self._resharded:
            self._resharded = None
            self.barrier()
            if self.env.rank == 0:
                reshard.remove(folder)

    def resume_folder(self, folder: Path, saved_world: int) -> Path:
        """A checkpoint of another tensor-parallel or world size: this rank's weights, AdamW moments
        and EMA slices merged from the saved files and split for this layout, beside `folder`."""
        files = shard_files(folder / FOLDER)
        if len(files) == self.tp_size and saved_world == self.env.world_size:
            return folder
        cache = reshard.cache_folder(folder, self.env.world_size)
        failed: Exception | None = None
        if self.env.rank == 0:
            try:
                reshard.prepare(folder, self.env.world_size)
                (cache / FOLDER).mkdir()
            except OSError as err:
                failed = err
        if self.any_rank([failed is not None])[0]:
            raise RuntimeError(f"cannot write the resharded copy of {folder}: {failed or 'see rank 0'}")
        try:
            states = [safe_load(f, map_location="cpu") for f in files]
            if self.data_rank == 0:
                torch.save(resharded_file(states, self.tp_rank, self.tp_size, self._optimizer_names()),
                           cache / FOLDER / f"tp_rank{self.tp_rank}.pt")
            reshard.write_local(folder, cache, self.env.rank, saved_world,
                                lambda local: self._resharded_ema(folder, states, local))
        except Exception as err:  # noqa: BLE001 - agreed below, so that no rank waits for one that failed
            failed = err
        if self.any_rank([failed is not None])[0]:
            raise RuntimeError(f"laying {folder} out for engine.tp_size={self.tp_size} failed: "
                               f"{failed or 'on another rank (see its log)'}")
        self._resharded = cache
        return cache

    def _resharded_ema(self, folder: Path, states: list[dict], local: dict) -> dict:
        """The EMA slices of the first saved replica (ranks 0..tp-1), merged and split for this rank."""
        if not (folder / "local_rank0.pt").exists():  # no per-rank state (train.ema_decay=0)
            return local
        slices = [safe_load(folder / f"local_rank{r}.pt", map_location="cpu") for r in range(len(states))]
        if "ema" not in slices[0]:
            return local
        layout = _layout(states[0])
        ema = {name: shard(unshard([s["ema"][name] for s in slices], layout[name]), layout[name], self.tp_rank,
                           self.tp_size) if name in layout else tensor
               for name, tensor in slices[0]["ema"].items()}
        return {**local, "ema": ema}

    def _optimizer_names(self) -> list[str]:
        """Parameter names in the optimizer's state-dict order (its indices), so that saved moments
        can be matched with their parameters' layout."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("tp_rank*.pt"), key=lambda p: int(p.stem[len("tp_rank"):]))


def _layout(state: dict) -> dict[str, Sharding]:
    return {k: Sharding(*v) for k, v in state["layout"].items()}


def _names(state: dict, fallback: list[str] | None) -> list[str]:
    names = state.get("optimizer_names", fallback)  # checkpoints before it was saved: this run's order
    if names is None:
        raise KeyError("the checkpoint records no optimizer parameter names (written by an older scaleyard)")
    return names


def consolidated_optimizer_state(files: list[Path], names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per parameter name, its optimizer state with split tensors merged (single-device shapes)."""
    return _merge_optimizer([safe_load(f, map_location="cpu") for f in files], names)


def _merge_optimizer(states: list[dict], names: list[str] | None) -> dict[str, dict[str, Any]]:
    layout, names = _layout(states[0]), _names(states[0], names)
    merged = {}
    for index, values in states[0]["optimizer"]["state"].items():
        name = names[index]
        how = layout.get(name)
        merged[name] = {key: unshard([s["optimizer"]["state"][index][key] for s in states], how)
                        if how is not None and torch.is_tensor(value) and value.dim() > 0 else value
                        for key, value in values.items()}
    return merged


def resharded_file(states: list[dict], tp_rank: int, tp_size: int, names: list[str]) -> dict[str, Any]:
    """The `tp_rank<R>.pt` content a run at `tp_size` would have written, from another size's files."""
    layout = _layout(states[0])
    full_model = {name: unshard([s["model"][name] for s in states], layout[name]) if name in layout else tensor
                  for name, tensor in states[0]["model"].items()}
    saved_names = _names(states[0], names)
    if saved_names != names:
        raise RuntimeError("the checkpoint's optimizer holds other parameters (or another order) than this model; "
                           "resume with the model configuration that wrote it")
    full_optimizer = _merge_optimizer(states, names)
    position = {name: index for index, name in enumerate(saved_names)}
    optimizer = {"param_groups": states[0]["optimizer"]["param_groups"], "state": {}}
    for name, values in full_optimizer.items():
        how = layout.get(name)
        optimizer["state"][position[name]] = {
            key: shard(value, how, tp_rank, tp_size) if how is not None and torch.is_tensor(value) and value.dim() > 0
            else value for key, value in values.items()}
    model = {name: shard(tensor, layout[name], tp_rank, tp_size) if name in layout else tensor
             for name, tensor in full_model.items()}
    return {"model": model, "optimizer": optimizer, "layout": states[0]["layout"], "tp_size": tp_size,
            "optimizer_names": saved_names}


def _local_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # megatron layers add an empty `_extra_state` entry per layer: nothing to keep
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def gather_full_state(module: nn.Module, layout: dict[str, Sharding], group, size: int) -> dict[str, torch.Tensor]:
    full = {}
    for name, tensor in _local_state(module).items():
        how = layout.get(name)
        if how is None:
            full[name] = tensor.clone()
            continue
        shards = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        full[name] = unshard(shards, how)
    return full


def merge_shard_files(files: list[Path]) -> dict[str, torch.Tensor]:
    """Single-device weights from a checkpoint's `tp_rank*.pt` files (no process group needed)."""
    states = [safe_load(f, map_location="cpu") for f in files]
    layout = {k: Sharding(*v) for k, v in states[0]["layout"].items()}
    if len(states) != states[0]["tp_size"]:
        raise FileNotFoundError(f"expected {states[0]['tp_size']} tensor-parallel files, found {len(states)}")
    return {name: unshard([s["model"][name] for s in states], layout[name]) if name in layout else tensor
            for name, tensor in states[0]["model"].items()}


def merge_ema_files(folder: Path, model_files: list[Path]) -> dict[str, torch.Tensor]:
    """The EMA of a tensor-parallel run: ranks 0..tp-1 (the first replica) hold its slices."""
    first = safe_load(model_files[0], map_location="cpu")
    layout = {k: Sharding(*v) for k, v in first["layout"].items()}
    slices = [safe_load(folder / f"local_rank{r}.pt", map_location="cpu")["ema"]
              for r in range(first["tp_size"])]
    return {name: unshard([s[name] for s in slices], layout[name]) if name in layout else tensor
            for name, tensor in slices[0].items()}


__all__ = ["MegatronEngine", "check_megatron", "consolidated_optimizer_state", "gather_full_state", "merge_ema_files",
           "merge_shard_files", "resharded_file"]
