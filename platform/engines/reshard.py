"""Resuming a sharded checkpoint at another world size: a folder laid out for the new world.

A sharded engine (ZeRO, tensor parallelism) whose checkpoint was written by another number of
ranks builds, beside the checkpoint, a folder `.tmp-reshard-step_*-world<N>` that the loaders read
as if this world had written it: `train_state.pt` and the RNG files of ranks that existed are
hard links to the originals, the engine writes its own files (and per-rank `local_rank<R>.pt`,
e.g. EMA partitions) for the new layout. The checkpoint itself is never modified. The folder is
removed once loaded; one left by a crash is removed at the next start (`.tmp-*`, like a partial
checkpoint, Checkpointer.clean_partial).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from scaleyard.platform.checkpoint_integrity import safe_load

PREFIX = ".tmp-reshard-"


def cache_folder(checkpoint: Path, world: int) -> Path:
    return checkpoint.with_name(f"{PREFIX}{checkpoint.name}-world{world}")


def prepare(checkpoint: Path, world: int) -> Path:
    """Rank 0: an empty cache folder with the world-independent files linked in."""
    cache = cache_folder(checkpoint, world)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and (path.name == "train_state.pt" or path.name.startswith("rng_rank")):
            _link(path, cache / path.name)
    return cache


def write_local(checkpoint: Path, cache: Path, rank: int, saved_world: int,
                transform: Callable[[dict], dict]) -> None:
    """This rank's `local_rank<R>.pt` in the cache: its saved file (if the rank existed) with
    `transform` applied (which rebuilds what is sharded, e.g. the EMA)."""
    own = checkpoint / f"local_rank{rank}.pt"
    state = safe_load(own, map_location="cpu") if own.exists() and rank < saved_world else {}
    torch.save(transform(state), cache / f"local_rank{rank}.pt")


def remove(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)
