"""The Job protocol and registry (DESIGN.md, "The Job protocol").

A job is a recipe: its Config, how to build its parts, the math of one training step, its
evaluation, and its FLOPs per sample. The platform owns everything else (loop, engines,
checkpoints, launch, metrics). Jobs are found by scanning `scaleyard.jobs.*` for a module-level
`JOB` and through the `scaleyard.jobs` entry-point group, so research code outside this
repository registers the same way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

if TYPE_CHECKING:
    from scaleyard.platform.planner import ModelShape


@dataclass
class Context:
    """What a job may know about where it runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    run_dir: Path
    generator: torch.Generator  # seeded from run.seed, identical on every rank
    # this rank among the model replicas: what the data is split over (tensor-parallel ranks of
    # one replica read the same batches); -1 = same as rank / world_size
    data_rank: int = -1
    data_world_size: int = -1

    def __post_init__(self) -> None:
        if self.data_rank < 0:
            self.data_rank, self.data_world_size = self.rank, self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class JobParts:
    """What `build` returns.

    model: every trainable module (several -> an nn.ModuleDict); the engine wraps it.
    frozen: modules used but never trained (a DPO reference model, a text encoder, a property
        predictor); the engine places them (and may shard them) but never steps them.
    train_data: a map-style dataset (sized and indexable, e.g. a torch Dataset; the platform reads
        it in a resumable, world-size-independent order, data_loaders/dataset_stream.py), or an
        iterable of batches with `state_dict()/load_state_dict()` (a ShardStream) whose position
        the platform saves. Anything else is refused before step 1.
    param_groups: optional function of the model returning AdamW parameter groups (dicts with
        "params" and any per-group options); default: weight decay on matrices only.
    blocks: the model's repeated blocks (what activation checkpointing wraps), as a function of
        the model returning its block modules; None = the name rule (`*blocks` lists, `*_block`).
    """

    model: nn.Module | None = None
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    train_data: Iterable[Any] | None = None
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None


@dataclass
class SampleRequest:
    """What `scaleyard sample RUN` asks of a trained run (see `Job.write_samples`)."""

    out: Path  # the file to write; its suffix picks the format (.csv / .parquet for tables)
    rows: int = 0  # rows to generate; with `impute`: at most this many known rows (0 = all)
    seed: int = 0
    impute: tuple[str, ...] = ()  # columns to fill in, the others kept from `known`
    known: str = ""  # a file or split folder holding the known rows
    target: dict[str, float] = field(default_factory=dict)  # --target PROP=VALUE: guide samples toward these
    prompt: str = ""  # --prompt / --question TEXT: what to generate for (a caption, a question)
    shots: str = ""  # --shots FILE: a user's examples (FSPO's shots, PPD's preference pairs)


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, C, H, W] in [0, 1]
    text: dict[str, str] = field(default_factory=dict)


def saved_config(job_cls: type[Job], saved: DictConfig) -> DictConfig:
    """A run's saved config (config.yaml, or the one in a checkpoint) under the job's Config of
    today: keys added since take their default, except those of `job_cls.saved_before`, which
    take the value that reproduces the saved run. Raises OmegaConf's error for a key since removed."""
    missing = {key: value for key, value in job_cls.saved_before.items()
               if OmegaConf.select(saved, key, default=_ABSENT) is _ABSENT}
    legacy = OmegaConf.from_dotlist([f"{key}={_dotlist_value(value)}" for key, value in missing.items()])
    return OmegaConf.merge(OmegaConf.structured(job_cls.Config), legacy, saved)


_ABSENT = object()


def _dotlist_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Job:
    """Base class of every job. Training jobs implement `build`, `train_step`, `evaluate` and
    `flops_per_sample`; sampling-only jobs set `trains = False` and implement `sample`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    trains: ClassVar[bool] = True
    # the sampling job (trains = False) that `scaleyard sample RUN` launches for this job's runs,
    # through the launch path of every run; "" : `write_samples` in the calling process
    sample_job: ClassVar[str] = ""
    # Config keys whose default changed what a run does, with the value every run saved before
    # the key existed had (e.g. an architecture default brought in line with a reference): a saved
    # config without the key reads as that value, not as the new default (`saved_config`).
    saved_before: ClassVar[dict[str, Any]] = {}

    def check(self, cfg: DictConfig, world_size: int) -> None:
        """Job-specific config checks beyond field metadata; raise ConfigError."""

    @staticmethod
    def builder_networks(builder: str, **kwargs: Any) -> Any:
        """The trained networks a data builder samples (for builders whose `networks_from` names
        this job, e.g. `ppd_pairs` -> ppd); kwargs are the builder's options that locate them."""
        raise NotImplementedError(f"this job supplies no networks to data builder {builder!r}")

    def stages(self, cfg: DictConfig) -> list:
        """The runs and data builds this run needs first (`scaleyard.platform.stages.Stage`), for
        the inputs its config leaves empty; the platform trains or builds them into
        <run.dir>/stages/<name> and fills the named config keys before `build` is called."""
        return []

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss (a scalar tensor, mean over the batch) and metrics for one micro-batch. `model` is
        the engine-wrapped module: calling it is what lets DDP/ZeRO hook the backward."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        """Runs on rank 0 with the unwrapped model (its EMA copy when train.ema_decay > 0)."""
        return EvalResult()

    def sample(self, cfg: DictConfig, ctx: Context) -> dict[str, float]:
        """Sampling-only jobs: load a checkpoint and generate; returns summary metrics."""
        raise NotImplementedError

    def write_samples(self, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
                      request: SampleRequest) -> dict[str, Any]:
        """`scaleyard sample`: generate from a trained run's weights (its EMA weights when it kept
        them) and write `request.out`; returns a summary. `job_state` is what `state_dict` saved."""
        able = sorted(name for name, job in registry().items() if job.write_samples is not Job.write_samples)
        raise NotImplementedError(f"job {self.name} cannot write samples; `scaleyard sample` works for runs of: "
                                  f"{', '.join(able) or 'no registered job'}")

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        """Model FLOPs of one training sample, forward + backward (0 if unknown)."""
        return 0.0

    @staticmethod
    def tp_plan(cfg: DictConfig) -> Any:
        """The model's tensor-parallel plan (declared beside the model, applied by
        engine.name=megatron); None: this job has none, so megatron is refused before anything
        is written."""
        return None

    @staticmethod
    def model_size(cfg: DictConfig) -> int | None:
        """Parameters that scaling laws should count (N); None: all trainable parameters."""
        return None

    @staticmethod
    def memory_shape(cfg: DictConfig) -> ModelShape | None:
        """The model's memory-relevant shape for the planner (platform/planner.py): parameter
        counts and its transformer stacks (language models: `planner.causal_lm_shape`). None:
        unknown; the planner then measures the model through `build_for_planning`."""
        return None

    def build_for_planning(self, cfg: DictConfig, ctx: Context, batch_size: int) -> JobParts | None:
        """Optional, for jobs without a `memory_shape`: lets `engine.name=auto` size the job on
        GPUs by measuring one forward/backward of its model (platform/planner_measure.py). Return
        the JobParts `build` would (at least `model`; `frozen` and `blocks` if it has them), with
        `train_data` a list holding one micro-batch of `batch_size` samples shaped like real ones
        (random values are fine), and without reading the data. The planner then calls
        `train_step(model, batch)` once, so set here what `train_step` reads, as `build` does.
        It runs on fake CPU tensors (no memory or arithmetic), so building an 8B model is free.
        A typical implementation:

            self.cfg, self.ctx = cfg, ctx
            images = torch.randn(batch_size, 1, 28, 28)
            labels = torch.randint(0, 10, (batch_size,))
            return JobParts(model=Net(model_config(cfg)), train_data=[{"image": images, "label": labels}])

        None (the default): not implemented; with no `memory_shape` either, `engine.name=auto`
        on GPUs is a config error naming this job."""
        return None

    @classmethod
    def model_presets(cls) -> list[dict[str, Any]]:
        """Rows for `scaleyard models`: one dict per model size the job offers, with `name`,
        `use` (how to pick it, e.g. "model.preset=dit_adaln-1B" or "--preset tiny"), `params`
        (exact trainable parameters; None when unknown here) and `flops_per_sample` (training
        FLOPs of one sample, forward + backward; None when unknown); further keys (width, depth,
        tokens, note) print as more columns. Default: one row per YAML preset, from
        `memory_shape` and `flops_per_sample` of its config."""
        from scaleyard.platform.config import resolve

        rows = []
        for name in cls.presets():
            cfg = resolve(cls.Config, [cls.presets_dir() / f"{name}.yaml"], [])
            shape = cls.memory_shape(cfg)
            rows.append({"name": name, "use": f"--preset {name}", "params": shape.trainable if shape else None,
                         "flops_per_sample": cls.flops_per_sample(cfg) or None})
        return rows

    @staticmethod
    def first_layer(cfg: DictConfig) -> str | None:
        """The dotted name, inside JobParts.model, of the layer that reads the raw input (an
        nn.Linear, nn.Conv2d or a patch embedding's Conv2d): where `optim.tract=true` applies
        TrAct (platform/tract.py). None: no such layer, and optim.tract is refused."""
        return None

    @classmethod
    def export_formats(cls) -> dict[str, str]:
        """Formats beyond safetensors that `scaleyard export RUN --format NAME` writes for this
        job's runs, name -> what it writes; each is produced by `export`."""
        return {}

    def export(self, fmt: str, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
               out: Path) -> dict[str, Any]:
        """Write `weights` (the trained model's full state dict) in format `fmt` to `out`;
        returns a summary (files written, sizes). Called only for a name in `export_formats`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def presets_dir(cls) -> Path:
        module = importlib.import_module(cls.__module__)
        return Path(module.__file__).parent / "presets"

    @classmethod
    def presets(cls) -> list[str]:
        folder = cls.presets_dir()
        return sorted(p.stem for p in folder.glob("*.yaml")) if folder.exists() else []


def builder_networks(job: str, builder: str, **kwargs: Any) -> Any:
    """What a data builder that samples trained networks asks of the job that owns them
    (`Builder.networks_from`; passed as `build(networks=...)`): `Job.builder_networks`, with a
    config error reported as the data error it is for the builder."""
    from scaleyard.data_loaders.index import DataError
    from scaleyard.platform.config import ConfigError

    try:
        return get_job(job).builder_networks(builder, **kwargs)
    except ConfigError as err:
        raise DataError(str(err)) from None


class UnknownJobError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


ENTRY_POINT_GROUP = "scaleyard.jobs"


class DuplicateJobError(ValueError):
    """Two sources register the same job name; nothing may run until one is renamed or removed."""


@dataclass(frozen=True)
class Registered:
    job: type[Job]
    source: str  # where it came from, for messages: a module path or an entry point and its distribution


def registry() -> dict[str, type[Job]]:
    """All jobs: `scaleyard.jobs.<name>.job.JOB` plus entry points in group `scaleyard.jobs`."""
    return {name: found.job for name, found in registered().items()}


def registered(refresh: bool = False) -> dict[str, Registered]:
    """Every job with where it came from. Scanned once per process (`get_job` is called from many
    places, and each scan reads every installed distribution's metadata); `refresh` rescans."""
    if refresh:
        _scan.cache_clear()
    return dict(_scan())


@functools.cache
def _scan() -> dict[str, Registered]:
    # A broken plugin must not take every command down with it (not even `scaleyard config` of a
    # built-in job): it is skipped with a warning that names it. Two jobs claiming one name is an
    # error, since silently picking one would run the wrong code.
    found: dict[str, Registered] = {}

    def add(job: Any, source: str) -> None:
        if not (isinstance(job, type) and issubclass(job, Job)):
            _warn(f"skipped {source}: it gives {job!r}, not a subclass of scaleyard.platform.job.Job")
            return
        name = getattr(job, "name", None)
        if not isinstance(name, str) or not name:
            _warn(f"skipped {source}: {job.__qualname__} has no `name` (a class attribute, e.g. name = \"myjob\")")
            return
        if name in found and found[name].job is not job:
            raise DuplicateJobError(
                f"job name {name!r} is registered twice: by {found[name].source} and by {source}; "
                f"rename one (its class attribute `name`) or uninstall the package you do not want"
            )
        found[name] = Registered(job, source)

    package = importlib.import_module("scaleyard.jobs")
    for info in pkgutil.iter_modules(package.__path__):
        module_name = f"scaleyard.jobs.{info.name}.job"
        if not info.ispkg:
            continue
        try:
            if importlib.util.find_spec(module_name) is None:  # a package without job.py: no job here
                continue
            module = importlib.import_module(module_name)
        except Exception as err:  # any import failure (of the package or its job.py): skip it, keep the others
            _warn(f"skipped built-in job module {module_name}: {type(err).__name__}: {err}")
            continue
        job = getattr(module, "JOB", None)
        if job is not None:
            add(job, f"module {module_name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = _entry_point_source(entry)
        try:
            job = entry.load()
        except Exception as err:  # a plugin may fail in any way while importing
            _warn(f"skipped {source}: {type(err).__name__}: {err}; fix that package or uninstall it")
            continue
        add(job, source)
    return found


def _entry_point_source(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    owner = f" of distribution {dist.name} {dist.version}" if dist is not None else ""
    return f"job entry point '{entry.name} = {entry.value}'{owner} (group {ENTRY_POINT_GROUP})"


def _warn(message: str) -> None:
    # stderr, not logging: the CLI logs to stdout, and a skipped plugin must stay visible there
    print(f"scaleyard: warning: {message}", file=sys.stderr, flush=True)


def job_summary(job: type[Job]) -> str:
    """First line of the job module's docstring (else the class's), '-' when it has none."""
    module = sys.modules.get(job.__module__)
    for doc in (getattr(module, "__doc__", None), job.__doc__):
        lines = (doc or "").strip().splitlines()
        if lines:
            return lines[0].strip()
    return "-"


def get_job(name: str) -> type[Job]:
    jobs = registry()
    if name not in jobs:
        raise UnknownJobError(f"unknown job {name!r}; registered jobs: {', '.join(sorted(jobs))}")
    return jobs[name]
