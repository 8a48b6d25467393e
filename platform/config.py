"""Typed run configuration: dataclasses -> OmegaConf, YAML presets, dotlist overrides, checks.

Every job's `Config` dataclass embeds the platform sections below. Fields may declare
`metadata={"choices": (...)}` or `{"min": x}` / `{"max": x}`; `check_config` enforces them so that
a wrong value is reported with its key and the allowed values before anything runs or is queued.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: engine.name=deepspeed only (loss scaling)
ENGINES = ("auto", "single", "ddp", "deepspeed", "megatron")
BACKENDS = ("auto", "gloo", "nccl")
SCHEDULES = ("cosine", "linear", "constant")
AUTO_LANES = 16  # data.lanes=0 (auto): a multiple of this and of the data-parallel world size


class ConfigError(ValueError):
    """A config value cannot run; the message names the key and what is allowed."""


def choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def bounded(default: float | int, low: float | None = None, high: float | None = None) -> Any:
    return field(default=default, metadata={"min": low, "max": high})


@dataclass
class RunConfig:
    dir: str = ""  # "" -> runs/<job>/<timestamp>, fixed when the run is launched
    seed: int = 0
    deterministic: bool = True


@dataclass
class TrainConfig:
    steps: int = bounded(1000, 1)
    batch_size: int = bounded(64, 1)  # global samples per optimizer step (all ranks, all micro-batches)
    grad_accum: int = bounded(1, 1)
    precision: str = choice("fp32", PRECISIONS)
    clip_grad_norm: float = bounded(1.0, 0.0)  # 0 turns clipping off (the norm is still logged)
    ema_decay: float = bounded(0.0, 0.0, 0.999999)  # 0 = no EMA
    log_every: int = bounded(20, 1)
    eval_every: int = bounded(0, 0)  # 0 = evaluate only at the end
    ckpt_every: int = bounded(500, 0)  # steps; 0 = only at the end (and on preemption)
    ckpt_every_minutes: float = bounded(0.0, 0.0)  # wall clock; 0 = off
    keep_checkpoints: int = bounded(2, 1)
    # recompute each transformer block's activations in backward (models expose `blocks`)
    activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = bounded(1e-3, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    beta1: float = bounded(0.9, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)
    eps: float = bounded(1e-8, 0.0)
    warmup_steps: int = bounded(0, 0)
    schedule: str = choice("cosine", SCHEDULES)
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)
    # TrAct (platform/tract.py): the first layer's weight gradient is preconditioned by
    # (X^T X / b + tract_lambda I)^-1; needs a job that declares its first layer
    tract: bool = False
    tract_lambda: float = bounded(0.1, 0.0)


@dataclass
class EngineConfig:
    # auto: the planner's choice on GPUs (platform/planner.py); single/ddp on CPU
    name: str = choice("auto", ENGINES)
    backend: str = choice("auto", BACKENDS)  # auto: nccl on GPU, gloo on CPU
    zero_stage: int = bounded(2, 0, 3)  # deepspeed: ZeRO stage
    offload_optimizer: bool = False  # deepspeed: optimizer states and step on CPU
    offload_params: bool = False  # deepspeed: parameters on CPU between uses (ZeRO-3 only)
    tp_size: int = bounded(1, 1)  # megatron: tensor-parallel ranks per model replica
    sequence_parallel: bool = False  # megatron: shard norms/dropout activations along the sequence
    # deepspeed ZeRO-3: gather the whole model while evaluating (see DeepSpeedEngine.evaluation)
    gather_params_for_eval: bool = True
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed JSON keys, merged last


@dataclass
class DataConfig:
    path: str = ""  # a split folder holding index.json, e.g. data/fashion_mnist/train
    eval_path: str = ""
    # reader lanes; 0 = auto, fixed at the first start (a multiple of 16 and of the data-parallel world
    # size) and recorded in config.yaml. A run resumes on any world size that divides it.
    lanes: int = bounded(0, 0)
    shuffle_block: int = bounded(256, 1)
    num_workers: int = bounded(0, 0)
    shard_base: str = ""  # "{name}" template for shards on other storage; "" = beside the index
    verify_hashes: bool = False
    max_skip_share: float = bounded(0.01, 0.0, 0.99)


@dataclass
class TrainingConfig:
    """The sections every training job has; a job's Config subclasses it and adds its own."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)


def batch_per_rank(cfg: DictConfig, world_size: int) -> int:
    """Samples one rank takes per micro-batch (`check_batch` guarantees it divides)."""
    return cfg.train.batch_size // (world_size * cfg.train.grad_accum)


def stream_config(cfg: DictConfig):
    """The reader settings of `cfg.data` (seeded by run.seed)."""
    from scaleyard.data_loaders.pipeline import StreamConfig

    d = cfg.data
    return StreamConfig(seed=cfg.run.seed, lanes=d.lanes, shuffle_block=d.shuffle_block, num_workers=d.num_workers,
                        shard_base=d.shard_base, verify_hashes=d.verify_hashes, max_skip_share=d.max_skip_share)


def to_dotlist(node: Any, prefix: str = "") -> list[str]:
    """A config (or a part of one) as command-line overrides that resolve back to the same values:
    JSON scalars and lists are YAML flow values, so strings keep their spaces, '=' and ','."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in to_dotlist(value, f"{prefix}{key}.")]
    return [f"{prefix[:-1]}={json.dumps(node)}"]


def resolve(config_cls: type, preset_files: list[Path], overrides: list[str]) -> DictConfig:
    """Structured defaults <- presets (in order) <- command-line dotlist."""
    cfg = OmegaConf.structured(config_cls)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not KEY=VALUE (for example optim.lr=3e-4)")
    try:
        for preset in preset_files:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(preset))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(config_cls, err)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {message}") from None
    return cfg


def _unknown_key_message(config_cls: type, err: ConfigKeyError) -> str:
    key = getattr(err, "full_key", "") or str(err)
    parent, _, leaf = key.rpartition(".")
    node: Any = config_cls
    for part in parent.split(".") if parent else []:
        sub = typing.get_type_hints(node).get(part)
        node = sub if dataclasses.is_dataclass(sub) else None
        if node is None:
            break
    allowed = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
    hint = f"; keys allowed here: {', '.join(allowed)}" if allowed else ""
    return f"unknown config key {key!r}{hint}"


def check_config(cfg: DictConfig, config_cls: type) -> None:
    """Enforce `choices` / `min` / `max` metadata on every field, recursively."""

    def walk(node: DictConfig, cls: type, prefix: str) -> None:
        types = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            name = spec.name
            value = node[name]
            key = f"{prefix}{name}"
            if isinstance(value, DictConfig) and dataclasses.is_dataclass(types[name]):
                walk(value, types[name], key + ".")
                continue
            choices = spec.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"config key {key!r}: {value!r} is not allowed; choose one of {', '.join(choices)}")
            low, high = spec.metadata.get("min"), spec.metadata.get("max")
            if low is not None and value < low:
                raise ConfigError(f"config key {key!r}: {value} is below the minimum {low}")
            if high is not None and value > high:
                raise ConfigError(f"config key {key!r}: {value} is above the maximum {high}")

    walk(cfg, config_cls, "")


def check_batch(cfg: DictConfig, world_size: int) -> None:
    per_step = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise ConfigError(
            f"config key 'train.batch_size': {cfg.train.batch_size} must be divisible by "
            f"world size x train.grad_accum = {world_size} x {cfg.train.grad_accum} = {per_step}"
        )
    lanes = cfg.data.lanes
    if lanes and lanes % world_size:
        usable = ", ".join(str(d) for d in range(1, lanes + 1) if lanes % d == 0)
        raise ConfigError(
            f"config key 'data.lanes': {lanes} must be a multiple of the data-parallel world size {world_size}; "
            f"with data.lanes={lanes} this run can use world sizes {usable} (a new run may set data.lanes=0, "
            "auto, or any multiple of its world size)"
        )


def default_run_dir(job_name: str) -> str:
    return str(Path("runs") / job_name / time.strftime("%Y%m%d-%H%M%S"))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    flat_old = _flatten(OmegaConf.to_container(old, resolve=True))
    flat_new = _flatten(OmegaConf.to_container(new, resolve=True))
    return sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out
