"""`engine.name=deepspeed`: DeepSpeed ZeRO stages 0-3 with optimizer/parameter offload.

The DeepSpeed JSON is generated from the platform config (batch, accumulation, clipping,
precision, ZeRO stage, offload) and `engine.deepspeed` keys are merged over it, so a user can pass
any DeepSpeed option through. The optimizer stays the platform's torch AdamW (param groups and
LR schedule unchanged); DeepSpeed wraps it. Frozen modules (a DPO reference model, encoders) and
the EMA copy go through `deepspeed.initialize` without an optimizer under ZeRO-3, so they are
partitioned like the trained model (as DeepSpeed-Chat does for its reference model); with sharded
parameters evaluation is collective (every rank runs it, rank 0 reports).

Checkpoints use DeepSpeed's sharded format inside the platform's checkpoint folder
(`step_*/deepspeed/`), written by every rank; `scaleyard export` consolidates them. A run resumes
at another data-parallel world size through DeepSpeed's universal checkpoint: the shards are
converted (`ds_to_universal`) into a folder beside the checkpoint and loaded with
`load_universal`; a ZeRO-3 EMA's partitions are merged and split again (`resume_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from scaleyard.platform.checkpoint_integrity import safe_load
from scaleyard.platform.config import ConfigError, batch_per_rank
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.engines import reshard
from scaleyard.platform.engines.activation_checkpointing import plain_name
from scaleyard.platform.engines.base import Blocks, DDPEngine
from scaleyard.platform.optim import EMA, copy_for_ema

log = logging.getLogger("scaleyard")
TAG = "deepspeed"  # sub-folder of a platform checkpoint that holds DeepSpeed's files
RESERVED_KEYS = ("optimizer", "scheduler")  # scaleyard builds these from optim.* (one source of truth)


def check_deepspeed(cfg: DictConfig, world_size: int, runs_here: bool = True) -> None:
    """Settings DeepSpeed cannot run, reported with the key before anything starts. Hardware
    checks (GPU for fp16, libaio for NVMe) only apply when the run starts on this machine, not
    when it is submitted from a login node."""
    e = cfg.engine
    if e.offload_params and e.zero_stage != 3:
        raise ConfigError(f"config key 'engine.offload_params': parameter offload needs engine.zero_stage=3 "
                          f"(got {e.zero_stage}); use engine.offload_optimizer for stages 1-2")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("config key 'engine.offload_optimizer': optimizer offload needs engine.zero_stage >= 1")
    for key in RESERVED_KEYS:
        if key in e.deepspeed:
            raise ConfigError(f"config key 'engine.deepspeed.{key}': scaleyard builds the {key} from optim.*; "
                              f"set optim.lr/optim.schedule/... instead")
    offload = e.deepspeed.get("zero_optimization", {})
    for part in ("offload_optimizer", "offload_param"):
        if runs_here and offload.get(part, {}).get("device") == "nvme":
            _require_op("AsyncIOBuilder", f"engine.deepspeed.zero_optimization.{part}.device=nvme",
                        "install libaio (apt install libaio-dev) and reinstall deepspeed, or offload to cpu")
    if runs_here and cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.precision': fp16 with DeepSpeed needs a GPU (loss scaling kernels); "
                          "use bf16 or fp32 on CPU")
    # found, not imported: an import costs several seconds here, paid again by every rank; an
    # installed but broken DeepSpeed still fails at the ranks' start, in their logs
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("engine.name=deepspeed needs the deepspeed package; pip install deepspeed==0.19.8")


def import_deepspeed() -> Any:
    """`import deepspeed`, without the xgboost its autotuner imports whenever it is installed (a
    dependency of scaleyard, for TabDiff's evaluation): about 3 of DeepSpeed's 4 s of import time
    here, in every rank and every export, for a tuner scaleyard never runs. Only DeepSpeed's own
    import is kept from xgboost; a later `import xgboost` works as usual."""
    blocked = "xgboost" not in sys.modules
    if blocked:
        sys.modules["xgboost"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("xgboost", 0) is None:
            del sys.modules["xgboost"]
    return deepspeed


def _require_op(builder_name: str, key: str, fix: str) -> None:
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not builder.is_compatible(verbose=False):
        raise ConfigError(f"config key {key!r}: DeepSpeed's {builder_name} op cannot be built here; {fix}")


def deepspeed_config(cfg: DictConfig, data_world_size: int, parameters: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated keys, then `engine.deepspeed` merged over them."""
    e = cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if parameters:
        # DeepSpeed's default buckets (5e8 elements) are sized for billion-parameter models; a
        # smaller model would allocate and clear gigabytes of buffer every step
        bucket = int(min(5e8, max(parameters, 2**20)))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    generated = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": batch_per_rank(cfg, data_world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": float(cfg.train.clip_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
        # the client optimizer is torch AdamW: no JIT-compiled FusedAdam/CPUAdam is needed, and
        # offload steps it on the CPU partitions
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the platform logs; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
    }
    merged = OmegaConf.merge(OmegaConf.create(generated), e.deepspeed)
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def _frozen_config(conf: dict[str, Any], ema: bool = False) -> dict[str, Any]:
    """Config for modules DeepSpeed partitions but never steps (reference models, the EMA). The
    EMA stays fp32 (averaging with weight 1e-3 in bf16 would round most updates away) and keeps
    no parameter gathered between uses: its partitions change every step, and a parameter
    DeepSpeed keeps whole ("persistent", under 1e5 elements by default) would go stale."""
    zero = {k: v for k, v in conf["zero_optimization"].items() if k in ("stage", "offload_param")}
    if ema:
        zero["stage3_param_persistence_threshold"] = 0
    off = {"enabled": False}
    low = {"bf16": off, "fp16": off} if ema else {"bf16": conf["bf16"], "fp16": conf["fp16"]}
    return {"train_micro_batch_size_per_gpu": conf["train_micro_batch_size_per_gpu"],
            "zero_optimization": zero, **low, "steps_per_print": conf["steps_per_print"]}


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (~100 s) when it
    initialises; it only speeds up CPU collectives, which here serve development and tests. The
    module object must come from importlib: `import deepspeed.comm.torch as m` yields torch's."""
    import_deepspeed()
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class ShardedEMA(EMA):
    """EMA of a ZeRO-3 model: the shadow is a second partitioned module; each rank averages its
    own partitions (no communication). Its state is per rank (`local_rank<R>.pt`)."""

    sharded = True

    def __init__(self, shadow: nn.Module, decay: float):  # noqa: D107 (EMA.__init__ deep-copies; not here)
        self.decay = decay
        self.shadow = shadow

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for ema_param, param in zip(self.shadow.parameters(), module.parameters()):
            ema_param.ds_tensor.lerp_(param.ds_tensor.to(ema_param.ds_tensor.dtype), weight)
        for ema_buffer, buffer in zip(self.shadow.buffers(), module.buffers()):  # never partitioned
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.ds_tensor.detach().cpu().clone() for name, p in self.shadow.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in self.shadow.named_parameters():
            p.ds_tensor.copy_(state[name])


class DeepSpeedEngine(DDPEngine):
    name = "deepspeed"
    replicated = False
    steps_before_norm_check = True

    def __init__(self, env: DistEnv, device: torch.device, cfg: DictConfig):
        if device.type == "cpu":
            _skip_cpu_shm_op()
        super().__init__(env, device, cfg)  # the process group
        # DeepSpeed reads its rank from the environment; srun sets only SLURM_* variables
        for key, value in (("LOCAL_RANK", env.local_rank), ("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(key, str(value))
        deepspeed = import_deepspeed()

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.ds_config = deepspeed_config(cfg, env.world_size)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.sharded_params = self.stage == 3
        self.low_precision = cfg.train.precision in ("bf16", "fp16")
        self.collective_eval = self.sharded_params
        self._ema_copy: nn.Module | None = None
        self._sharded_ema: ShardedEMA | None = None
        self._universal: Path | None = None  # the converted folder `load_state` is about to read
        self._ds_engines: list[Any] = []  # every deepspeed.initialize result, destroyed by close()

    def wrap(self, model: nn.Module, frozen: dict[str, nn.Module], tp_plan: Any = None,
             blocks: Blocks | None = None) -> nn.Module:
        deepspeed = import_deepspeed()

        self.ds_config = deepspeed_config(self.cfg, self.env.world_size, sum(p.numel() for p in model.parameters()))
        if self.sharded_params and self.cfg.train.ema_decay > 0:
            # copied before partitioning, so the shadow is partitioned exactly like the model, and
            # before the model moves, so two whole copies never sit on the GPU
            self._ema_copy = copy_for_ema(model).requires_grad_(False)
        self.module = model.to(self.device)
        self.checkpoint_activations(blocks)
        for name, module in frozen.items():
            module.to(self.device).eval().requires_grad_(False)
            if self.sharded_params:
                frozen_engine, _, _, _ = deepspeed.initialize(model=module, config=_frozen_config(self.ds_config))
                self._ds_engines.append(frozen_engine)
                log.info("frozen module %r partitioned with ZeRO-3", name)
        self.wrapped = self.module
        return self.module

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> nn.Module:
        deepspeed = import_deepspeed()

        self.wrapped, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=self.ds_config)
        self._ds_engines.append(self.wrapped)
        self.optimizer = optimizer
        return self.wrapped

    def make_ema(self, decay: float) -> EMA:
        if self._ema_copy is None:
            return super().make_ema(decay)
        deepspeed = import_deepspeed()

        shadow, _, _, _ = deepspeed.initialize(model=self._ema_copy, config=_frozen_config(self.ds_config, ema=True))
        self._ds_engines.append(shadow)
        ema = ShardedEMA(shadow.module, decay)
        self._ema_copy = None
        self._sharded_ema = ema
        return ema

    def close(self) -> None:
        """Remove DeepSpeed's hooks and release what its engines hold (ZeRO-3 parameter
        coordinators, group handles) while the process group still exists. Left to interpreter exit,
        their teardown raced gloo's and a rank could abort after a finished run (seen as SIGABRT,
        "terminate called without an active exception", on a 2-rank ZeRO-3 run with a frozen
        reference model)."""
        while self._ds_engines:
            self._ds_engines.pop().destroy()

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """ZeRO-3 fetches a partitioned parameter only inside its module's forward; evaluation code
        often reads parameters elsewhere (a sampler's learned schedule, an embedding table), where
        it would see empty tensors. So the whole model is gathered for the evaluation: one full copy
        per rank while it runs, which is what DDP holds all the time. engine.gather_params_for_eval=false
        keeps the partitions (for models that do not fit whole and evaluate through forward only)."""
        if not self.sharded_params or not self.cfg.engine.gather_params_for_eval:
            return contextlib.nullcontext()
        return _gathered_for_evaluation(model)

    # --- one step -----------------------------------------------------------------------------
    def accumulating(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed defers or buckets the reduction itself

    def backward(self, loss: torch.Tensor) -> None:
        # the Trainer already divides by grad_accum; DeepSpeed must not divide again
        self.wrapped.backward(loss, scale_wrt_gas=False)
        if not self.wrapped.is_gradient_accumulation_boundary():
            self.wrapped.step()  # advances DeepSpeed's micro-step counter; the update waits

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """DeepSpeed clips (gradient_clipping = train.clip_grad_norm) and steps. Unlike the
        plain engines it has already stepped when the norm turns out non-finite (bf16 has no
        overflow check); the Trainer then stops before anything is saved."""
        own_norm = None
        if self.stage == 0 and not self.low_precision:  # plain torch optimizer: DeepSpeed keeps no norm
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            own_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.wrapped.step()
        norm = self.wrapped.get_global_grad_norm() if own_norm is None else own_norm
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def step_skipped(self) -> bool:
        """fp16: DeepSpeed skips the update when the scaled gradients overflow and lowers the
        loss scale; the Trainer then neither fails nor advances the schedule or the EMA."""
        return self.cfg.train.precision == "fp16" and not self.wrapped.was_step_applied()

    # --- state --------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights, fp32 master copies under bf16/fp16 (what `scaleyard export` writes).
        Collective under ZeRO-3: every rank calls it."""
        return full_state(self.module, self.sharded_params, self.low_precision)

    def save_state(self, folder: Path) -> None:
        self.wrapped.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load_state(self, folder: Path) -> None:
        universal = folder == self._universal
        # load_universal is read only by load_checkpoint, so it is set for this one load rather than
        # at initialize (when the checkpoint's world size is not known yet)
        config = self.wrapped._config
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
        try:
            path, _ = self.wrapped.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False, load_module_strict=True)
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise FileNotFoundError(f"{folder / TAG} holds no DeepSpeed checkpoint")
        if universal:
            self._repair_zero3_universal_load(folder)
            self._universal = None
            self.barrier()
            if self.env.rank == 0:
                reshard.remove(folder)

    def resume_folder(self, folder: Path, saved_world: int) -> Path:
        """Another data-parallel world size: rank 0 converts the shards into a universal checkpoint
        beside `folder` (never modified); each rank rebuilds its ZeRO-3 EMA partitions."""
        if saved_world == self.env.world_size:
            return folder
        cache = reshard.cache_folder(folder, self.env.world_size)
        failed: Exception | None = None
        if self.env.rank == 0:
            try:
                reshard.prepare(folder, self.env.world_size)
                to_universal(folder / TAG, cache / TAG)
            except Exception as err:  # noqa: BLE001 - reported on every rank below, not left to hang them
                failed = err
        if self.any_rank([failed is not None])[0]:
            raise RuntimeError(f"converting {folder / TAG} to a universal checkpoint failed"
                               f"{f': {failed}' if failed else ' on rank 0 (see its log)'}")
        try:
            reshard.write_local(folder, cache, self.env.rank, saved_world,
                                lambda local: self._resharded_ema(folder, saved_world, local))
        except Exception as err:  # noqa: BLE001 - agreed below, so that no rank waits for one that failed
            failed = err
        if self.any_rank([failed is not None])[0]:
            raise RuntimeError(f"splitting the ZeRO-3 EMA of {folder} for {self.env.world_size} ranks failed: "
                               f"{failed or 'on another rank (see its log)'}")
        log.info("resuming %s (%d ranks) at %d ranks through a universal checkpoint", folder.name, saved_world,
                 self.env.world_size)
        self._universal = cache
        return cache

    def _resharded_ema(self, folder: Path, saved_world: int, local: dict) -> dict:
        """ZeRO-3 EMA: every saved rank's partitions, concatenated (the flat parameter, end-padded),
        then cut into this world's partitions (`export._zero3_ema` merges them the same way)."""
        if self._sharded_ema is None:
            return local
        parts = [safe_load(folder / f"local_rank{r}.pt", map_location="cpu")["ema"] for r in range(saved_world)]
        rank, out = self.env.rank, {}
        for name, param in self._sharded_ema.shadow.named_parameters():
            size = param.ds_tensor.numel()
            flat = torch.cat([p[name].flatten() for p in parts])[: param.ds_numel]
            mine = flat[rank * size: (rank + 1) * size]
            out[name] = torch.cat([mine, mine.new_zeros(size - mine.numel())])
        return {**local, "ema": out}

    def _repair_zero3_universal_load(self, folder: Path) -> None:
        """Two defects of ZeRO-3's universal load in DeepSpeed 0.19.8
        (stage3 `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), undone here: every parameter
        group gets the first saved group's settings (e.g. weight decay on norms and biases), and all
        groups share one `step` tensor, which AdamW then advances once per group and step (wrong
        bias correction from the first step on)."""
        if self.stage != 3:
            return
        saved = torch.load(folder / TAG / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=False)  # written by our own conversion of a verified checkpoint
        for group, saved_group in zip(self.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's `ds_to_universal` in this process (one worker: no process pool to spawn)."""
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # the platform's models carry no Megatron-style universal-checkpoint info
                              inject_missing_state=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", printed.getvalue())


@contextlib.contextmanager
def _gathered_for_evaluation(model: nn.Module) -> Iterator[None]:
    """The whole ZeRO-3 model gathered, and kept gathered through forward passes: DeepSpeed's
    module hooks release a module's parameters after its forward even inside GatheredParameters,
    except those flagged as external (its flag for parameters used outside their own module)."""
    deepspeed = import_deepspeed()
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        flags = [getattr(p, "is_external_param", False) for p in params]
        for p in params:
            p.is_external_param = True
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.is_external_param = flag


def full_state(module: nn.Module, sharded: bool, low_precision: bool = False) -> dict[str, torch.Tensor]:
    """One parameter at a time, to the CPU: gathering a whole ZeRO-3 model at once would need the
    full model on every GPU, which is what ZeRO-3 is there to avoid."""
    deepspeed = import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if low_precision and param.requires_grad else None
        if full is None and sharded:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach().clone()
        out[plain_name(name)] = (param.detach() if full is None else full).cpu().clone()
    for name, value in module.state_dict().items():  # buffers (never partitioned)
        if name not in out:
            out[name] = value.detach().cpu().clone()
    return out

