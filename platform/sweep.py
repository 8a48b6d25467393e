"""Sweeps: a base job config plus a grid of overrides or an IsoFLOP ladder, submitted as one
job array, recorded in `manifest.json`, resumable (finished runs are skipped).

Spec (YAML):
    job: t2i
    preset: default            # the job's YAML preset
    base: [data.path=..., train.batch_size=32]
    grid: {optim.lr: [1e-3, 3e-3]}             # either a grid ...
    isoflop:                                   # ... or an IsoFLOP ladder
      key: model.preset                        # the override that picks the model size
      values: [uvit-cpu-xs, uvit-cpu-s, uvit-cpu-m]
      budgets: [1e12, 3e12]                    # training FLOPs; steps = budget / (flops_per_sample * batch)
    concurrency: 2
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaleyard.platform.config import ConfigError
from scaleyard.platform.launch import Prepared, check_run_dir, prepare, write_config

MANIFEST = "manifest.json"


@dataclass
class SweepSpec:
    job: str
    preset: str | None = None
    base: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    isoflop: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 4

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        body = yaml.safe_load(Path(path).read_text()) or {}
        allowed = {"job", "preset", "base", "grid", "isoflop", "concurrency"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ConfigError(f"sweep spec {path}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
        if "job" not in body:
            raise ConfigError(f"sweep spec {path}: missing 'job' (the job to sweep, e.g. t2i)")
        spec = cls(**body)
        if not spec.grid and not spec.isoflop:
            raise ConfigError(f"sweep spec {path} has no axes: give 'grid' (override -> values) or 'isoflop' "
                              "(key, values, budgets)")
        if spec.grid and spec.isoflop:
            raise ConfigError(f"sweep spec {path}: give 'grid' or 'isoflop', not both")
        if spec.isoflop:
            missing = {"values", "budgets"} - set(spec.isoflop)
            if missing:
                raise ConfigError(f"sweep spec {path}: isoflop needs {sorted(missing)}")
        if spec.concurrency < 1:
            raise ConfigError(f"sweep spec {path}: concurrency must be at least 1")
        return spec

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "preset": self.preset, "base": self.base, "grid": self.grid,
                "isoflop": self.isoflop, "concurrency": self.concurrency}


@dataclass
class PlannedRun:
    name: str
    overrides: list[str]
    prepared: Prepared


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


def expand(spec: SweepSpec, sweep_dir: Path, world_size: int = 1) -> list[PlannedRun]:
    """Every run of the sweep, validated (config, steps from budgets) before anything is queued."""
    points: list[tuple[str, list[str]]] = []
    if spec.grid:
        keys = sorted(spec.grid)
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            name = "_".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in zip(keys, values))
            points.append((name, [f"{k}={v}" for k, v in zip(keys, values)]))
    else:
        key = spec.isoflop.get("key", "model.preset")
        for value, budget in itertools.product(spec.isoflop["values"], spec.isoflop["budgets"]):
            budget = float(budget)
            probe = prepare(spec.job, [*spec.base, f"{key}={value}"], spec.preset, world_size)
            per_step = probe.job.flops_per_sample(probe.cfg) * probe.cfg.train.batch_size
            if per_step <= 0:
                raise ConfigError(f"job {spec.job} reports no flops_per_sample: an IsoFLOP ladder needs it")
            steps = math.floor(budget / per_step)
            if steps < 1:
                raise ConfigError(f"budget {budget:.3g} FLOPs is too small for one step of {key}={value} "
                                  f"({per_step:.3g} FLOPs per step at train.batch_size={probe.cfg.train.batch_size})")
            points.append((f"{_slug(value)}_C{budget:.2e}", [f"{key}={value}", f"train.steps={steps}"]))
    runs = []
    for name, overrides in points:
        run_overrides = [*spec.base, *overrides, f"run.dir={sweep_dir.absolute() / name}"]
        runs.append(PlannedRun(name, run_overrides, prepare(spec.job, run_overrides, spec.preset, world_size)))
    return runs


def launch(spec_path: Path, sweep_dir: Path, cluster: str, profile_name: str | None) -> dict[str, Any]:
    from scaleyard.slurm.launch import submit_array
    from scaleyard.slurm.profiles import check_profile, load_profile
    from scaleyard.slurm.task import RunTask

    spec = SweepSpec.load(spec_path)
    profile = load_profile(profile_name or "local")
    check_profile(profile, cluster)
    manifest_file = sweep_dir / MANIFEST
    if manifest_file.exists():
        recorded = json.loads(manifest_file.read_text())["spec"]
        if recorded != spec.as_dict():
            raise ConfigError(f"{sweep_dir} holds a different sweep ({MANIFEST}); use another folder")
    runs = expand(spec, sweep_dir, profile.world_size)
    pending, skipped = [], []
    for run in runs:
        state = check_run_dir(run.prepared)
        if state == "finished" or _in_queue(run.prepared.run_dir):
            skipped.append(run.name)
        else:
            pending.append(run)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"spec": spec.as_dict(), "runs": [{"name": r.name, "overrides": r.overrides} for r in runs]}
    (sweep_dir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    (sweep_dir / (MANIFEST + ".tmp")).rename(manifest_file)
    for run in pending:
        write_config(run.prepared)
    tasks = [RunTask(spec.job, run.prepared.preset, run.prepared.overrides, str(run.prepared.run_dir))
             for run in pending]
    if tasks:
        submit_array(tasks, cluster, profile, f"sy-sweep-{spec.job}", sweep_dir / "submitit", spec.concurrency)
    return {"runs": len(runs), "submitted": [r.name for r in pending], "skipped": skipped}


def _in_queue(run_dir: Path) -> bool:
    from scaleyard.slurm.launch import job_of, read_submission

    submission = read_submission(run_dir)
    if submission is None:
        return False
    try:
        return job_of(submission).state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")
    except Exception:  # noqa: BLE001 - an unknown state means: submit again
        return False
