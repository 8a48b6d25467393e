"""`scaleyard plan`: a job's config without launch-time checks, and the planner's table and reasons
as text (platform/planner.py holds the model and the policy)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig

from scaleyard.platform.config import ConfigError, check_config, resolve
from scaleyard.platform.job import Job, get_job
from scaleyard.platform.planner import FRAGMENTATION, FRAMEWORK_BYTES, GB, Plan, overrides


def load_config(job_name: str, overrides_: list[str], preset: str | None = None) -> tuple[type[Job], DictConfig]:
    """A job's resolved, checked config, without the launch-time checks (batch split, data) that
    depend on the GPU count the planner is choosing for."""
    job_cls = get_job(job_name)
    names = job_cls.presets()
    preset = ("default" if "default" in names else "") if preset is None else preset
    if preset and preset not in names:
        raise ConfigError(f"unknown preset {preset!r} for job {job_name}; presets: {', '.join(names) or 'none'}")
    cfg = resolve(job_cls.Config, [job_cls.presets_dir() / f"{preset}.yaml"] if preset else [], overrides_)
    check_config(cfg, job_cls.Config)
    return job_cls, cfg


def format_plan(plan: Plan) -> str:
    """The candidates table (GB per GPU) and the recommendation with its reasons."""
    head = (f"{'option':33s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'ema':>6s} {'buffers':>7s} "
            f"{'act/sample':>10s} {'micro':>6s} {'total':>7s}  note")
    lines = [f"per-GPU memory (GB) on {plan.gpus} x {plan.gpu_memory_gb:g} GB; total = allocated x "
             f"{1 + FRAGMENTATION:g} + {FRAMEWORK_BYTES / GB:g} GB, at the largest micro-batch that fits", head]
    for r in plan.candidates:
        m = r.memory
        lines.append(f"{r.candidate.label:33s} {m.params / GB:7.2f} {m.grads / GB:7.2f} {m.optimizer / GB:7.2f} "
                     f"{m.ema / GB:6.2f} {m.buffers / GB:7.2f} {r.activations_per_sample / GB:10.4f} "
                     f"{r.max_micro_batch or '-':>6} {m.total / GB:7.1f}  {r.note}")
    lines += ["", f"recommended: {', '.join(overrides(plan))} (micro-batch {plan.micro_batch} per GPU)"]
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data: memory in GB, the overrides, every candidate."""
    out = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("memory", "candidates")}
    out["memory_gb"] = plan.memory.as_gb()
    out["overrides"] = overrides(plan)
    out["candidates"] = [{"candidate": c.candidate.label, **dataclasses.asdict(c.candidate),
                          "max_micro_batch": c.max_micro_batch, "per_replica_batch": c.per_replica_batch,
                          "memory_gb": c.memory.as_gb(), "note": c.note,
                          "activations_per_sample_gb": round(c.activations_per_sample / GB, 4)}
                         for c in plan.candidates]
    return out
