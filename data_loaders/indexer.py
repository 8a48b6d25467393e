"""`scaleyard data index SOURCE --out DIR`: make shards written elsewhere readable where they lie.

SOURCE is a folder of `.tar` shards, a brace (or glob) pattern (`shards/{000000..000999}.tar`), or
URLs webdataset opens (`pipe:aws s3 cp s3://bucket/{000000..000999}.tar -`, `https://...`). Each
shard is read once, in parallel: its bytes are hashed while tarfile parses them, samples are
grouped as webdataset groups them (so the counts are the reader's counts), the header offset of
every `seek_every`-th sample is kept (O(1) resume inside a local shard), and every image member
is decoded once to find the corrupt ones. Only `DIR/index.json` is written, and only at the end.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from tqdm import tqdm

from scaleyard.data_loaders.foreign import CAPTION_FIELD, IMAGE_FIELD, ForeignView
from scaleyard.data_loaders.images import IMAGE_EXTENSIONS, check_decodes, read_header
from scaleyard.data_loaders.index import INDEX_FILE, DataError, ShardIndex, ShardInfo, kept_member

SEEK_EVERY = 64
MAX_NAMES = 1000  # corrupt members / incomplete samples named in the index (all are counted)
_GLOB = set("*?[")


def _is_url(source: str) -> bool:
    return source.startswith("pipe:") or "://" in source


def expand_source(source: str) -> list[str]:
    """The shards of SOURCE in order: local paths (checked to exist) or URLs. Fails naming what
    is missing before anything is read."""
    if _is_url(source):
        return list(wds.shardlists.expand_urls(source))
    path = Path(source)
    if path.is_dir():
        shards = sorted(str(p) for p in path.iterdir() if p.name.endswith(".tar") and p.is_file())
        if not shards:
            raise DataError(f"{source} holds no .tar shards; point SOURCE at the folder that holds them "
                            "or give a pattern such as 'shards/{000000..000099}.tar'")
        return shards
    names = list(wds.shardlists.expand_urls(source))
    if any(_GLOB & set(name) for name in names):
        names = [match for name in names for match in sorted(glob.glob(name))]
        if not names:
            raise DataError(f"SOURCE {source} matches no file; check the pattern")
    missing = [name for name in names if not os.path.isfile(name)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        what = "matches nothing" if len(missing) == len(names) else f"names {len(missing)} missing shard(s)"
        raise DataError(f"SOURCE {source} {what}: {missing[0]} does not exist{more}; "
                        "fix the path or the brace range")
    return names


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it: the shard is read once for both
    its sha256 and its tar members (`tarfile` in stream mode reads strictly forward)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.digest, self.position = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.position += len(data)
        return len(data)

    def finish(self) -> str:
        while block := self.raw.read(1 << 20):  # the tar's end blocks and padding
            self.digest.update(block)
        return self.digest.hexdigest()


@dataclass
class ShardScan:
    url: str
    count: int = 0
    sha256: str = ""
    offsets: list[int] = field(default_factory=list)
    layouts: Counter = field(default_factory=Counter)  # sorted member extensions -> samples
    examples: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # layout -> first keys
    corrupt: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    labels: set[int] = field(default_factory=set)
    problem: str = ""  # a tar-level failure: the shard ends early


def scan_shard(url: str, seek_every: int = SEEK_EVERY, caption: str = "txt", decode_check: bool = True) -> ShardScan:
    """Count, hash and check one shard, grouping members into samples as webdataset's
    `group_by_keys` does (same key split, same filter, lower-cased extensions)."""
    scan = ShardScan(url)
    local = not _is_url(url)
    try:
        raw = open(url, "rb") if local else wds.gopen(url, "rb")  # noqa: SIM115 - closed below
    except Exception as err:  # noqa: BLE001 - any opener failure names the shard
        raise DataError(f"cannot open shard {url}: {err}") from err
    stream = _Hashing(raw)
    key, members = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            # offsets into a compressed stream cannot be seeked to
            compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
            for member in tar:
                if not kept_member(member):
                    continue
                prefix, ext = wds.tariterators.base_plus_ext(member.name)
                if prefix is None:
                    continue
                ext = ext.lower()
                if prefix != key:
                    _close_sample(scan, key, members, caption, decode_check)
                    if scan.count % seek_every == 0 and local and not compressed:
                        scan.offsets.append(member.offset)
                    scan.count += 1
                    key, members = prefix, {}
                if ext in members:
                    raise DataError(f"duplicate member {member.name}")
                members[ext] = tar.extractfile(member).read()
                tar.members = []  # keep memory flat on big shards
    except Exception as err:  # noqa: BLE001 - the reader stops at the same point; record why
        scan.problem = f"{type(err).__name__}: {err}"
    _close_sample(scan, key, members, caption, decode_check)
    try:
        scan.sha256 = stream.finish()
        raw.close()  # a `pipe:` command's exit status is checked here
    except Exception as err:  # noqa: BLE001 - named below
        raise DataError(f"reading shard {url} failed: {err}") from err
    if scan.problem and scan.count == 0:
        raise DataError(f"shard {url} is not a readable tar file ({scan.problem}); remove it from SOURCE or "
                        "replace it")
    if scan.offsets and len(scan.offsets) != (scan.count + seek_every - 1) // seek_every:
        scan.offsets = []  # cannot happen for a plain tar; never record offsets that do not match
    return scan


def _close_sample(scan: ShardScan, key: str | None, members: dict[str, bytes], caption: str,
                  decode_check: bool) -> None:
    if key is None:
        return
    layout = set(members)
    for ext in (e for e in IMAGE_EXTENSIONS if e in members):
        try:
            header = check_decodes(members[ext]) if decode_check else read_header(members[ext])
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "corrupt"
            scan.corrupt.append(f"{Path(scan.url).name}:{key}.{ext}: {type(err).__name__}: {err}")
            continue
        scan.widths.append(header.width)
        scan.heights.append(header.height)
        scan.modes[header.mode] += 1
        scan.formats[header.format] += 1
    if caption.startswith("json:") and "json" in members:
        try:
            meta = json.loads(members["json"])
            if isinstance(meta, dict) and meta.get(caption[5:]) is not None:
                layout.add(caption)
        except ValueError:
            scan.corrupt.append(f"{Path(scan.url).name}:{key}.json: not valid JSON")
    if "cls" in members:
        try:
            scan.labels.add(int(members["cls"]))
        except ValueError:
            scan.corrupt.append(f"{Path(scan.url).name}:{key}.cls: not an integer")
    signature = tuple(sorted(layout))
    scan.layouts[signature] += 1
    names = scan.examples.setdefault(signature, [])
    if len(names) < 5:
        names.append(f"{Path(scan.url).name}:{key}")


def _scan_all(urls: list[str], workers: int, caption: str, decode_check: bool, seek_every: int) -> list[ShardScan]:
    """Scans in SOURCE order; processes (image checks are CPU-bound), one bar over shards."""
    scans: list[ShardScan | None] = [None] * len(urls)
    interactive = sys.stderr.isatty()
    bar = tqdm(total=len(urls), unit="shard", desc="indexing", mininterval=0.5 if interactive else 30)
    try:
        if workers <= 1:
            for number, url in enumerate(urls):
                scans[number] = scan_shard(url, seek_every, caption, decode_check)
                bar.update(1)
                bar.set_postfix(samples=sum(s.count for s in scans if s))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(scan_shard, url, seek_every, caption, decode_check): n
                           for n, url in enumerate(urls)}
                for future in as_completed(futures):
                    scans[futures[future]] = future.result()
                    bar.update(1)
                    bar.set_postfix(samples=sum(s.count for s in scans if s))
    finally:
        bar.close()
    return [s for s in scans if s is not None]


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {"min": int(array.min()), "median": float(np.median(array)), "mean": round(float(array.mean()), 2),
            "max": int(array.max())}


def build_index(scans: list[ShardScan], *, source: str, split: str, size: int, crop: str, caption: str,
                seek_every: int = SEEK_EVERY) -> ShardIndex:
    """The index of scanned shards: counts, hashes, offsets, the schema seen through the view, stats."""
    layouts: Counter = Counter()
    examples: dict[tuple[str, ...], list[str]] = {}
    for scan in scans:
        layouts.update(scan.layouts)
        for layout, names in scan.examples.items():
            examples.setdefault(layout, []).extend(names)
    fields = Counter(ext for layout, n in layouts.items() for ext in layout for _ in range(n))
    image_fields = tuple(e for e in IMAGE_EXTENSIONS if fields[e])
    total = sum(scan.count for scan in scans)

    def incomplete(has) -> dict[str, Any]:
        bad = [layout for layout in layouts if not has(layout)]
        keys = [name for layout in bad for name in examples[layout]]
        return {"count": sum(layouts[layout] for layout in bad), "examples": keys[:20]}

    schema: dict[str, str] = {}
    missing: dict[str, Any] = {}
    extra: dict[str, Any] = {"source": source, "fields": dict(sorted(fields.items()))}
    if image_fields:
        view = ForeignView(image_fields, size, crop, caption)
        schema[IMAGE_FIELD] = (f"uint8[{size},{size},3] RGB from {'|'.join(image_fields)} members "
                               f"(shorter side resized to {size}, {crop} crop)")
        missing[IMAGE_FIELD] = incomplete(lambda layout: any(e in layout for e in image_fields))
        caption_present = fields[caption] if caption.startswith("json:") else fields[view.caption_member]
        if caption_present:
            schema[CAPTION_FIELD] = f"caption from {caption}"
            missing[CAPTION_FIELD] = incomplete(lambda layout: caption in layout)
        extra["view"] = view.describe()
        extra["image_shape"] = [3, size, size]
    # other members are part of the schema (required by default) only where every sample has them
    for ext, count in fields.items():
        if ext not in image_fields and ext != caption and ext not in schema and count == total:
            schema[ext] = "class index" if ext == "cls" else f"member .{ext}"
    if not schema:
        raise DataError(f"SOURCE {source}: the shards hold no member kind that every sample has "
                        f"(seen: {dict(fields)}); they are not webdataset shards of one layout")
    labels = set().union(*(scan.labels for scan in scans))
    if "cls" in schema and labels:
        extra["class_names"] = [str(i) for i in range(max(labels) + 1)]
    corrupt = [name for scan in scans for name in scan.corrupt]
    extra["corrupt"] = {"count": len(corrupt), "members": corrupt[:MAX_NAMES]}
    extra["incomplete"] = {k: v for k, v in missing.items() if v["count"]}
    extra["truncated_shards"] = {scan.url: scan.problem for scan in scans if scan.problem}
    widths = [w for scan in scans for w in scan.widths]
    extra["image_stats"] = {
        "images": len(widths), "width": _stats(widths), "height": _stats([h for s in scans for h in s.heights]),
        "shorter_than_size": sum(min(w, h) < size for s in scans for w, h in zip(s.widths, s.heights)),
        "modes": dict(sum((s.modes for s in scans), Counter())),
        "formats": dict(sum((s.formats for s in scans), Counter())),
    }
    shards = [ShardInfo(name=str(Path(s.url).resolve()) if not _is_url(s.url) else s.url, count=s.count,
                        sha256=s.sha256, offsets=tuple(s.offsets)) for s in scans if s.count]
    return ShardIndex(builder="foreign", version="1", split=split, shards=shards, schema=schema, extra=extra,
                      seek_every=seek_every)


def index_shards(source: str, out: str | Path, *, size: int = 256, crop: str = "center", caption: str = "txt",
                 workers: int = 0, force: bool = False, decode_check: bool = True,
                 seek_every: int = SEEK_EVERY) -> ShardIndex:
    """Scan SOURCE's shards and write `out/index.json` pointing at them (nothing is copied)."""
    out = Path(out)
    target = out / INDEX_FILE
    if target.exists() and not force:
        raise DataError(f"{target} already exists; pass --force to replace it (the shards are not touched)")
    ForeignView(("jpg",), size, crop, caption)  # a bad --size/--crop fails before any shard is read
    if not (caption.startswith("json:") and len(caption) > 5) and caption.startswith("json"):
        raise DataError(f"--caption {caption!r}: give a member extension (txt) or json:KEY, e.g. json:caption")
    urls = expand_source(source)
    workers = workers or min(len(urls), os.cpu_count() or 1, 16)
    scans = _scan_all(urls, workers, caption, decode_check, seek_every)
    index = build_index(scans, source=source, split=out.name, size=size, crop=crop, caption=caption,
                        seek_every=seek_every)
    if not index.shards:
        raise DataError(f"SOURCE {source}: its {len(urls)} shard(s) hold no samples")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{INDEX_FILE}.partial"
    partial.write_text(index.to_json())
    partial.replace(target)  # atomic: a reader never sees half an index
    index.root = str(out)
    return index
