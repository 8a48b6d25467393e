"""Launch path of sampling-only jobs (guided sampling, SRDS, safe denoising): same set-up as
training (distributed init, device, seeded context, run folder), then `job.sample`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from scaleyard.platform.distributed import DistEnv, init_process_group, pick_device
from scaleyard.platform.job import Context, Job
from scaleyard.platform.trainer import seed_everything

# Where sampling jobs write what they draw: a run folder holding files here has started, so its
# config may no longer change (launch.check_run_dir), as a training run's may not once it has a
# checkpoint.
SAMPLES_DIR = "samples"


def has_samples(run_dir: Path) -> bool:
    folder = run_dir / SAMPLES_DIR
    return folder.is_dir() and any(folder.iterdir())


def run_sampling(job: Job, cfg: DictConfig, env: DistEnv) -> dict:
    seed_everything(cfg.run.seed + env.rank)
    device = pick_device(env)
    init_process_group(env, cfg.engine.backend if "engine" in cfg else "auto")
    run_dir = Path(cfg.run.dir)
    ctx = Context(env.rank, env.world_size, env.local_rank, device, run_dir,
                  torch.Generator().manual_seed(cfg.run.seed))
    metrics = job.sample(cfg, ctx)
    summary = {"job": job.name, "metrics": metrics, "world_size": env.world_size}
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
