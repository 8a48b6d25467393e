"""Write samples as WebDataset shards plus the scaleyard index."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from scaleyard.data_loaders.index import INDEX_FILE, DataError, ShardIndex, ShardInfo, sha256_file

SHARD_PATTERN = "shard-%06d.tar"
SEEK_EVERY = 64


def sample_offsets(path: Path, seek_every: int) -> tuple[int, ...]:
    """Header offsets of every `seek_every`-th sample (a sample = consecutive members that share
    a key, as webdataset groups them)."""
    offsets, last_key, number = [], None, -1
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key != last_key:
                number, last_key = number + 1, key
                if number % seek_every == 0:
                    offsets.append(member.offset)
    return tuple(offsets)


def write_split(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    builder: str,
    version: str,
    split: str,
    schema: dict[str, str],
    shard_size: int,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    seek_every: int = SEEK_EVERY,
) -> ShardIndex:
    """Write `samples` (webdataset dicts with `__key__`) into `out_dir`.

    Shards are written into a sibling temporary folder and moved into place only when complete,
    so an interrupted build never leaves a folder that looks usable. Tar headers carry a fixed
    mtime and owner so building twice gives byte-identical shards.
    """
    out_dir = Path(out_dir)
    if shard_size <= 0:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size}")
    if (out_dir / INDEX_FILE).exists() and not overwrite:
        raise DataError(f"{out_dir} already holds a dataset ({INDEX_FILE}); pass --overwrite to rebuild it")
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    counts: list[int] = []
    with wds.ShardWriter(
        str(tmp_dir / SHARD_PATTERN),
        maxcount=shard_size,
        maxsize=float("inf"),
        verbose=0,
        mtime=0,  # an int: a float mtime makes tarfile add a PAX header to every member
        user="scaleyard",
        group="scaleyard",
    ) as sink:
        for position, sample in enumerate(samples):
            sink.write(sample)
            if position % shard_size == 0:
                counts.append(0)
            counts[-1] += 1
    if not counts:
        shutil.rmtree(tmp_dir)
        raise DataError(f"builder {builder} produced no samples for split {split}")

    shards = []
    for number, count in enumerate(counts):
        name = SHARD_PATTERN % number
        shards.append(ShardInfo(name=name, count=count, sha256=sha256_file(tmp_dir / name),
                                offsets=sample_offsets(tmp_dir / name, seek_every)))
    index = ShardIndex(builder=builder, version=version, split=split, shards=shards, schema=schema,
                       extra=extra or {}, seek_every=seek_every)
    (tmp_dir / INDEX_FILE).write_text(index.to_json())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    index.root = str(out_dir)
    return index
