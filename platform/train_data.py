"""What a job hands the Trainer as training data, checked before step 1.

A map-style dataset (sized and indexable: what most researchers already have) is wrapped in a
DatasetStream, which gives it the shard readers' guarantees (exact resume, a global order that
does not depend on the world size); a stream that can save its position is used as it is;
anything else is refused with the fix, instead of failing at the first checkpoint.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from scaleyard.platform.config import batch_per_rank
from scaleyard.platform.job import Context, JobParts


class BuildError(ValueError):
    """`Job.build` returned parts the Trainer cannot train; the message names the fix (the CLI
    prints it and exits 2, as for a config error)."""


def train_stream(parts: JobParts, cfg: DictConfig, ctx: Context, job_name: str) -> Any:
    """The job's training data as a resumable stream, checked before step 1: a stream with
    `state_dict()/load_state_dict()` as is, a map-style dataset wrapped in a DatasetStream."""
    from scaleyard.data_loaders.dataset_stream import DatasetStream, is_map_style

    data = parts.train_data
    if data is None:
        raise BuildError(f"job {job_name}: build() returned no train_data; return a map-style Dataset or a "
                         "ShardStream in JobParts(train_data=...)")
    if is_map_style(data):
        return DatasetStream(data, batch_per_rank=batch_per_rank(cfg, ctx.data_world_size), rank=ctx.data_rank,
                             world_size=ctx.data_world_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers)
    resumable = all(callable(getattr(data, name, None)) for name in ("state_dict", "load_state_dict", "__iter__"))
    if not resumable:
        raise BuildError(
            f"job {job_name}: build() returned train_data of type {type(data).__name__}, which cannot be resumed "
            "(it needs state_dict()/load_state_dict() to save its position in checkpoints). Return a map-style "
            "dataset (sized and indexable, e.g. a torch.utils.data.Dataset: the platform makes it resumable) or a "
            "ShardStream over WebDataset shards (scaleyard.data_loaders.pipeline)"
        )
    return data
