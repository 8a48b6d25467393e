"""The planner's measured path: activation memory of a job that declares no `memory_shape`, from
one forward/backward of its model (built by the job's `build_for_planning` hook).

A small model (up to REAL_PARAMETERS) runs one real step on the CPU; a larger one runs on fake
CPU tensors (torch's FakeTensorMode: shapes, dtypes and strides without memory or arithmetic), so
an 8B model is measured on a laptop. A tracker follows every storage the step creates until it is
freed, so the peak includes what autograd saves and the transients of backward, as the allocator
sees them. Two micro-batch sizes give bytes per sample (the slope) and a fixed part; a second pair
with the job's repeated blocks checkpointed gives the same under activation checkpointing.
CPU kernels stand in for GPU ones; where they keep different tensors for backward the estimate
differs (attention keeps its output and log-sum-exp on both).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from scaleyard.platform.config import ConfigError
from scaleyard.platform.planner_shapes import MeasuredActivations, ModelShape

if TYPE_CHECKING:
    from scaleyard.platform.job import Job, JobParts

log = logging.getLogger("scaleyard")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MICRO_BATCHES = (1, 2)  # the two sizes the slope comes from
# Models up to this size run one real step on the CPU: exact (the allocator's own numbers) and a
# second or two; larger ones run on fake tensors: free, but code that branches on fake tensors
# may take another path (Hugging Face builds an explicit causal mask: +10% for a Llama).
REAL_PARAMETERS = 20e6

HOOK_HELP = ("implement `memory_shape(cfg)` (its transformer stacks; platform/planner.py has causal_lm_shape for "
             "language models) or `build_for_planning(cfg, ctx, batch_size)` (its model and one random batch, "
             "which the planner measures) in the job")


class NotMeasurable(Exception):
    """The job's step cannot run on fake tensors."""


def measure_shape(job_cls: type[Job], cfg: DictConfig) -> ModelShape:
    """The ModelShape of a job without a declared one: parameter counts from the built model and
    activation bytes measured at cfg.train.precision. Raises ConfigError naming the job and the
    hook when it implements neither, or when a large model's step does not run on fake tensors."""
    try:
        parameters = sum(_parameters(job_cls, cfg, fake=True))
    except ConfigError:
        raise
    except Exception as err:  # a build that needs real values: small models only, hopefully
        log.info("planner: job %s's model does not build on fake tensors (%s)", job_cls.name, err)
        parameters = 0
    if parameters <= REAL_PARAMETERS:
        return _measure_all(job_cls, cfg, fake=False)
    try:
        return _measure_all(job_cls, cfg, fake=True)
    except NotMeasurable as why:
        raise ConfigError(f"the planner cannot measure job {job_cls.name!r}: its step does not run on fake tensors "
                          f"({why}) and its {parameters / 1e6:.0f}M parameters are too many to run here; "
                          f"implement `memory_shape(cfg)` in the job, or set engine.name") from None


def _measure_all(job_cls: type[Job], cfg: DictConfig, fake: bool) -> ModelShape:
    trainable, frozen = _parameters(job_cls, cfg, fake)
    precision = str(cfg.train.precision)
    plain = [_measure_step(job_cls, cfg, m, False, fake) for m in MICRO_BATCHES]
    per_sample, fixed = _line(plain)
    checkpointed = [_measure_step(job_cls, cfg, m, True, fake) for m in MICRO_BATCHES]
    ckpt_per_sample, ckpt_fixed = _line(checkpointed) if None not in checkpointed else (None, 0.0)
    how = (f"measured: one forward/backward of job {job_cls.name}'s model at micro-batches "
           f"{' and '.join(map(str, MICRO_BATCHES))} on {'fake' if fake else 'real'} CPU tensors, {precision}")
    measured = MeasuredActivations(precision, per_sample, fixed, ckpt_per_sample, ckpt_fixed, how)
    return ModelShape(trainable + frozen, trainable, frozen, measured=measured)


def _line(peaks: list[float | None]) -> tuple[float, float]:
    """(bytes per sample, fixed bytes) through the points at MICRO_BATCHES; never negative."""
    (m1, p1), (m2, p2) = zip(MICRO_BATCHES, peaks)
    slope = max((p2 - p1) / (m2 - m1), 0.0)
    return slope, max(p1 - slope * m1, 0.0)


def _parameters(job_cls: type[Job], cfg: DictConfig, fake: bool = True) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the model the hook builds."""
    with _planning_parts(job_cls, cfg, 1, fake) as (_, parts):
        trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in parts.model.parameters() if not p.requires_grad)
        frozen += sum(p.numel() for module in parts.frozen.values() for p in module.parameters())
    return trainable, frozen


@contextlib.contextmanager
def _planning_parts(job_cls: type[Job], cfg: DictConfig, batch_size: int, fake: bool):
    """(job, parts) from the job's hook, on fake or real CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from scaleyard.platform.job import Context

    job = job_cls()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    # planning runs in the launching process, which may train next: its torch RNG stays untouched
    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]), mode:
        torch.manual_seed(int(cfg.run.seed))
        ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), run_dir=Path(scratch),
                      generator=torch.Generator().manual_seed(int(cfg.run.seed)))
        parts = job.build_for_planning(cfg, ctx, batch_size)
        if parts is None or parts.model is None:
            raise ConfigError(f"the planner (engine.name=auto on GPUs, scaleyard plan) cannot size job "
                              f"{job_cls.name!r}: it neither describes nor builds its model for planning; {HOOK_HELP}; "
                              f"or choose engine.name (single, ddp, deepspeed, megatron) yourself")
        yield job, parts


def _measure_step(job_cls: type[Job], cfg: DictConfig, batch_size: int, checkpointing: bool,
                  fake: bool) -> float | None:
    """Activation bytes at the peak of one forward/backward (above parameters and gradients,
    which exist before it as under gradient accumulation; the batch counted in); None when
    checkpointing finds no blocks."""
    with _planning_parts(job_cls, cfg, batch_size, fake) as (job, parts):
        model = parts.model
        if checkpointing and not _checkpoint_blocks(model, parts):
            return None
        batch = next(iter(parts.train_data or ()), None)
        if batch is None:
            raise ConfigError(f"job {job_cls.name!r}: build_for_planning must return JobParts whose train_data "
                              f"yields one micro-batch of {batch_size} samples")
        modules = (model, *parts.frozen.values())
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        inputs = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
        existing = [*inputs, *(t for m in modules for t in (*m.parameters(), *m.buffers())),
                    *(p.grad for p in model.parameters() if p.grad is not None)]
        model.train()
        dtype = AUTOCAST_DTYPES.get(str(cfg.train.precision))
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        tracker = _PeakTracker(existing, {id(p) for m in modules for p in m.parameters()})
        try:
            with tracker:
                with autocast:
                    loss = job.train_step(model, batch)[0]
                loss.backward()
        except Exception as err:  # a data-dependent op on fake tensors; real errors recur on real tensors
            if fake:
                raise NotMeasurable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
            raise
        return float(tracker.peak + sum(t.untyped_storage().nbytes() for t in inputs))


def _checkpoint_blocks(model: nn.Module, parts: JobParts) -> int:
    """Wrap the job's repeated blocks as train.activation_checkpointing does (JobParts.blocks,
    else the engine's name rule); 0 when there are none."""
    from scaleyard.platform.engines.activation_checkpointing import apply_activation_checkpointing

    try:
        return apply_activation_checkpointing(model, parts.blocks)
    except ValueError:  # nothing to checkpoint
        return 0


class _PeakTracker(TorchDispatchMode):
    """The peak of the bytes that an op's outputs newly allocate, as the allocator would see
    them: each new storage counts from the op that made it until Python frees it. Hand-written
    rather than torch's MemTracker, which snapshots every module at every op (seconds for a tiny
    model here, minutes for a large one) for a breakdown the planner does not need. Autocast's
    16-bit copies of parameters are left out: the planner counts them as engine buffers."""

    def __init__(self, existing: list[torch.Tensor], params: set[int]):
        super().__init__()
        self.known = WeakIdKeyDictionary({t.untyped_storage(): True for t in existing})
        self.params = params
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args and id(args[0]) in self.params:
            self.known[out.untyped_storage()] = True  # autocast's weight cast: known, so its views count neither
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self.known:
            return
        size = storage.nbytes()
        self.known[storage] = True
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size
