"""The shard index: `index.json` beside a split's `.tar` shards.

webdataset itself keeps no record of how many samples a shard holds; the readers need that count
to start at any global sample index without opening earlier shards, and the hash lets a run
refuse a shard that changed under it. So every split written by scaleyard carries this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INDEX_FILE = "index.json"
INDEX_FORMAT = 1


class DataError(RuntimeError):
    """A dataset cannot be used as it is; the message names the file or shard and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    # Byte offset of every `seek_every`-th sample's first tar member: a reader resuming inside
    # a local shard seeks there instead of parsing every earlier header.
    offsets: tuple[int, ...] = ()


@dataclass
class ShardIndex:
    builder: str
    version: str
    split: str
    shards: list[ShardInfo]
    schema: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    seek_every: int = 0  # samples between recorded offsets (0: none recorded)
    root: str = ""  # folder the index was read from; not written to the file

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def shard_url(self, shard: ShardInfo, base: str = "") -> str:
        """Where to open a shard: `base` is a template with `{name}` (e.g. a `pipe:` command or an
        fsspec URL for object storage); by default shards sit beside the index."""
        if base:
            return base.format(name=shard.name)
        if _is_url(shard.name):
            return shard.name
        return str(Path(self.root) / shard.name)

    def to_json(self) -> str:
        body = {
            "format": INDEX_FORMAT,
            "builder": self.builder,
            "version": self.version,
            "split": self.split,
            "num_samples": self.total,
            "shards": [asdict(s) for s in self.shards],
            "seek_every": self.seek_every,
            "schema": self.schema,
            "extra": self.extra,
        }
        return json.dumps(body, indent=1, sort_keys=True)


def _is_url(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


def kept_member(member: tarfile.TarInfo) -> bool:
    """The members webdataset's tar reader passes on (it drops `__meta__`-style names): the local
    seeking reader and `scaleyard data index` count samples the same way as the URL reader."""
    name = member.name
    if not member.isreg() or (name.startswith("__") and "/" not in name and name.endswith("__")):
        return False
    return not re.match(r"__[^/]*__($|/)", name)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_index(path: str | os.PathLike) -> ShardIndex:
    """Read a split's index; `path` is the split folder or the index file itself."""
    path = Path(path)
    file = path / INDEX_FILE if path.is_dir() or not path.suffix else path
    if not file.exists():
        hint = ""
        if path.is_dir() and any((path / d / INDEX_FILE).exists() for d in ("train", "test")):
            hint = f" (it holds splits: point at {path}/train or {path}/test)"
        raise DataError(
            f"no shard index at {file}{hint}; build one with `scaleyard data build NAME --out DIR`"
        )
    try:
        body = json.loads(file.read_text())
        shards = [ShardInfo(**{**s, "offsets": tuple(s.get("offsets", ()))}) for s in body["shards"]]
        index = ShardIndex(
            builder=body["builder"],
            version=body["version"],
            split=body["split"],
            shards=shards,
            schema=body["schema"],
            extra=body.get("extra", {}),
            seek_every=int(body.get("seek_every", 0)),
            root=str(file.parent),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise DataError(f"{file} is not a scaleyard shard index ({err!r}); rebuild the dataset") from err
    if not shards or index.total <= 0:
        raise DataError(f"{file} lists no samples; rebuild the dataset")
    return index


def check_shards(index: ShardIndex, base: str = "", verify_hashes: bool = False) -> None:
    """Fail at start-up, naming the shard, when a local shard is missing or (with
    `verify_hashes`) its content differs from the index. Remote URLs are checked when read."""
    for shard in index.shards:
        url = index.shard_url(shard, base)
        if _is_url(url):
            continue
        if not os.path.exists(url):
            raise DataError(
                f"shard {shard.name} listed in {index.root}/{INDEX_FILE} is missing at {url}; "
                "restore it or rebuild the dataset"
            )
        if verify_hashes:
            actual = sha256_file(url)
            if actual != shard.sha256:
                raise DataError(
                    f"shard {shard.name} at {url} has sha256 {actual[:16]}..., the index says "
                    f"{shard.sha256[:16]}...; the file changed after the index was written: "
                    "rebuild the dataset or restore the shard"
                )
