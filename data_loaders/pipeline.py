"""Deterministic, resumable, rank- and worker-split reading of scaleyard shards.

See `order.py` for the global order. This module reads it: each DataLoader worker of each rank
reads its lanes row by row and hands over one (possibly empty) piece per row, so the main
process can merge the workers' pieces back into the rank's positions in increasing order.
Bad samples keep their position (as None) so that the bookkeeping never drifts: they are
counted, reported, and left out of the batch.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaleyard.data_loaders.foreign import ForeignView, view_of
from scaleyard.data_loaders.index import DataError, ShardIndex, check_shards, kept_member
from scaleyard.data_loaders.order import EpochOrder, OrderSpec, count_owned, lanes_of

log = logging.getLogger(__name__)

Decode = Callable[[dict[str, Any], int], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]
Item = tuple[int, Any, str]  # (global position, decoded sample or None, error message or "")


@dataclass(frozen=True)
class StreamConfig:
    seed: int = 0
    lanes: int = 16
    shuffle_block: int = 256
    num_workers: int = 0
    shard_base: str = ""  # "{name}" template for shards elsewhere (pipe:, s3://, ...); "" = beside index
    verify_hashes: bool = False
    max_skip_share: float = 0.01


@dataclass(frozen=True)
class ShardSource:
    url: str
    count: int
    offsets: tuple[int, ...]
    seek_every: int

    @property
    def seekable(self) -> bool:
        return bool(self.offsets) and self.seek_every > 0 and not (self.url.startswith("pipe:") or "://" in self.url)


def read_shard(source: ShardSource, first: int, required: tuple[str, ...]) -> Iterator[tuple[dict | None, str]]:
    """Raw samples `first`..`count-1` of one shard in tar order, exactly that many: a sample that
    cannot be read (truncated tar, missing field) comes out as (None, reason). Local shards with
    recorded offsets are entered by seeking; other URLs are read from the start. A required field
    "a|b" is present when either member is (foreign shards: "jpg|png|webp")."""
    problems: list[str] = []

    def note(exn: Exception) -> bool:
        problems.append(f"{type(exn).__name__}: {exn}")
        return False  # stop reading this shard: after a tar error the stream position is unknown

    expected = source.count - first
    if source.seekable:
        point = min(first // source.seek_every, len(source.offsets) - 1)
        skip = first - point * source.seek_every
        handle = open(source.url, "rb")  # noqa: SIM115 - closed in the finally below
        handle.seek(source.offsets[point])
        files = _local_members(handle, source.url, note)
    else:
        skip, handle = first, None
        streams = wds.tariterators.url_opener([{"url": source.url}], handler=note)
        files = wds.tariterators.tar_file_expander(streams, handler=note)
    samples = wds.tariterators.group_by_keys(files, handler=note)
    produced = 0
    try:
        for sample in samples:
            if skip:
                skip -= 1
                continue
            if produced == expected:
                break
            produced += 1
            missing = [f for f in required if not any(part in sample for part in f.split("|"))]
            if missing:
                yield None, f"sample {sample.get('__key__')} in {source.url} lacks field(s) {missing}"
            else:
                yield sample, ""
    except Exception as exn:  # noqa: BLE001 - any read failure becomes counted skips below
        problems.append(f"{type(exn).__name__}: {exn}")
    finally:
        if handle is not None:
            handle.close()
    if produced < expected:
        reason = f"shard {source.url} ended after {first + produced} of {source.count} samples"
        if problems:
            reason += f" ({problems[0]})"
        for _ in range(expected - produced):
            yield None, reason


def _local_members(handle, url: str, note: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Tar members of a local shard from the handle's current offset, in the form webdataset's
    `group_by_keys` takes. Random-access tarfile on a plain file, because webdataset's stream
    mode ("r|*") goes through tarfile's _Stream buffer and costs ~15% of loader throughput."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
        for member in tar:
            if kept_member(member):
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            tar.members = []  # keep memory flat on big shards
    except Exception as exn:  # noqa: BLE001 - reported like webdataset's handler would
        note(exn)
    yield {}  # webdataset's end-of-shard marker: flush the last sample


def flat_samples(order: EpochOrder, sources: list[ShardSource], flat: int,
                 required: tuple[str, ...]) -> Iterator[tuple[dict | None, str]]:
    """This epoch's samples in flat order (shards in shuffled order, end to end) from `flat`."""
    slot, offset = order.locate(flat)
    for shard in order.shard_order[slot:]:
        yield from read_shard(sources[shard], offset, required)
        offset = 0


def lane_samples(order: EpochOrder, lane: int, start: int, sources: list[ShardSource],
                 required: tuple[str, ...]) -> Iterator[tuple[dict | None, str]]:
    """Samples of one lane from lane position `start` on. The bounded shuffle permutes blocks of
    `shuffle_block` consecutive lane positions; resuming inside a block re-reads (without
    decoding) only that block's earlier samples, and earlier shards are never opened."""
    block_size = order.spec.shuffle_block
    length = order.lane_length(lane)
    block = start // block_size
    reader = flat_samples(order, sources, order.lane_start(lane) + block * block_size, required)
    first = start - block * block_size
    while block * block_size < length:
        size = min(block_size, length - block * block_size)
        samples = list(itertools.islice(reader, size))
        permutation = order.block_permutation(lane, block, size)
        for inner in range(first, size):
            yield samples[permutation[inner]]
        block, first = block + 1, 0
    reader.close()


class _RowPieces(IterableDataset):
    """What one worker of one rank produces: for every row of the global order, the decoded
    samples of its own lanes in that row (an empty list when it owns none there)."""

    def __init__(self, spec: OrderSpec, sources: list[ShardSource], required: tuple[str, ...], decode: Decode,
                 rank: int, world_size: int, num_workers: int, start: int, view: ForeignView | None = None):
        super().__init__()
        self.spec, self.sources, self.required, self.decode = spec, sources, required, decode
        self.view = view
        self.rank, self.world_size, self.num_workers, self.start = rank, world_size, num_workers, start

    def __iter__(self) -> Iterator[list[Item]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        lanes_total, total = self.spec.lanes, self.spec.total
        lanes = lanes_of(self.rank, self.world_size, worker, max(1, self.num_workers), lanes_total)
        epoch, first = divmod(self.start, total)
        while True:
            order = EpochOrder(self.spec, epoch)
            first_row, first_lane = divmod(first, lanes_total)
            streams = {
                lane: lane_samples(order, lane, first_row + (lane < first_lane), self.sources, self.required)
                for lane in lanes
            }
            for row in range(first_row, order.rows):
                piece = []
                for lane in lanes:
                    g = row * lanes_total + lane
                    if g < first or g >= total:
                        continue
                    raw, problem = next(streams[lane])
                    position = epoch * total + g
                    piece.append(self._decoded(raw, problem, position))
                yield piece
            epoch, first = epoch + 1, 0

    def _decoded(self, raw: dict | None, problem: str, position: int) -> Item:
        if raw is None:
            return position, None, problem
        try:
            if self.view is not None:
                raw = self.view(raw, position)
            return position, self.decode(raw, position), ""
        except Exception as exn:  # noqa: BLE001 - a sample that fails to decode is a counted skip
            return position, None, f"sample {raw.get('__key__')} in {raw.get('__url__')}: {exn!r}"


def _as_is(item: Any) -> Any:
    """DataLoader's default per-item conversion walks every sample dict; ours are final already."""
    return item


class ShardStream:
    """The batches one rank trains on, starting at a global sample index.

    Every step consumes one global batch of `batch_per_rank * world_size` positions; this rank
    takes the positions it owns. `state_dict()` is the global index of the next unconsumed
    position: resuming from it, with any world size that divides `lanes`, continues the same
    global sequence.
    """

    def __init__(self, index: ShardIndex, config: StreamConfig, *, decode: Decode, collate: Collate,
                 batch_per_rank: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 required: tuple[str, ...] | None = None):
        if config.lanes % world_size:
            raise DataError(
                f"data.lanes={config.lanes} must be a multiple of the world size {world_size} "
                "(each rank reads whole lanes); pick a lanes value that divides by every world size "
                "you may resume on, e.g. 16 or 64"
            )
        if config.shuffle_block <= 0:
            raise DataError(f"data.shuffle_block must be positive, got {config.shuffle_block}")
        if not 0.0 <= config.max_skip_share < 1.0:
            raise DataError(f"data.max_skip_share must be in [0, 1), got {config.max_skip_share}")
        check_shards(index, config.shard_base, config.verify_hashes)
        self.index, self.config = index, config
        self.decode, self.collate = decode, collate
        self.batch_per_rank, self.rank, self.world_size = batch_per_rank, rank, world_size
        self.position = start
        self.required = tuple(required if required is not None else index.schema)
        # shards written elsewhere: their members are mapped onto the fields the decoders read
        self.view = view_of(index, config.seed)
        if self.view is not None:
            self.required = tuple(self.view.raw_fields(f) for f in self.required)
        self.spec = OrderSpec.from_index(index, config.seed, config.lanes, config.shuffle_block)
        self.sources = [ShardSource(index.shard_url(s, config.shard_base), s.count, s.offsets, index.seek_every)
                        for s in index.shards]
        self.seen = 0
        self.skipped = 0
        self.problems: list[str] = []

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    # the share is judged over at least this many samples: one bad sample in a run's first batch
    # is not yet a broken dataset
    MIN_SAMPLES_FOR_SHARE = 1000

    def too_many_skips(self) -> bool:
        """More than `max_skip_share` of the samples seen so far were unreadable."""
        return self.skipped > self.config.max_skip_share * max(self.seen, self.MIN_SAMPLES_FOR_SHARE)

    def state_dict(self) -> dict[str, int]:
        return {"global_index": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["global_index"])

    def _items(self) -> Iterator[Item]:
        workers = self.config.num_workers
        pieces = _RowPieces(self.spec, self.sources, self.required, self.decode,
                            self.rank, self.world_size, workers, self.position, self.view)
        # A private generator: creating a DataLoader iterator draws a seed, and drawing it from
        # the global RNG would shift dropout & co. after every resume (resume would not be exact).
        loader = DataLoader(pieces, batch_size=None, num_workers=workers, persistent_workers=False, collate_fn=_as_is,
                            multiprocessing_context="fork" if workers else None,
                            generator=torch.Generator().manual_seed(self.config.seed))
        rows = iter(loader)
        while True:
            row: list[Item] = []
            for _ in range(max(1, workers)):
                row.extend(next(rows))
            row.sort(key=lambda item: item[0])
            yield from row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        total = self.spec.total
        while True:
            start, stop = self.position, self.position + self.global_batch
            wanted = count_owned(start, stop, self.rank, total, self.world_size)
            samples = []
            for _ in range(wanted):
                position, sample, problem = next(items)
                if sample is None:
                    self._skip(position, problem)
                else:
                    samples.append(sample)
            self.seen += wanted
            self.position = stop
            if not samples:
                raise DataError(
                    f"rank {self.rank}: every sample of the batch at global index {start} was unreadable; "
                    f"last problem: {self.problems[-1] if self.problems else 'unknown'}"
                )
            batch = self.collate(samples)
            batch["_positions"] = (start, stop)
            yield batch

    def _skip(self, position: int, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < 20:
            self.problems.append(problem)
            log.warning("rank %d skipped global position %d: %s", self.rank, position, problem)


def stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate: tensors are stacked, everything else is gathered into lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def first_samples(index: ShardIndex, decode: Decode, count: int, batch: int) -> Iterator[dict[str, Any]]:
    """One pass over the first `count` samples of a split, in an order that never changes
    (evaluation sets): batches of `batch` (the last one may be smaller)."""
    stream = ShardStream(index, StreamConfig(seed=0, lanes=1, shuffle_block=1), decode=decode, collate=stack,
                         batch_per_rank=batch)
    seen, count = 0, min(count, index.total)
    for item in stream:
        take = min(batch, count - seen)
        yield {k: v[:take] for k, v in item.items() if not k.startswith("_")}
        seen += take
        if seen >= count:
            return


def shard_samples(index: ShardIndex, number: int, decode: Decode, required: tuple[str, ...] | None = None,
                  shard_base: str = "") -> Iterator[tuple[dict | None, str]]:
    """Every sample of one shard in tar order, decoded (through the index's view for shards
    written elsewhere): (sample, "") or (None, why it was skipped). For passes that process a
    split shard by shard (`scaleyard data encode`); positions count from the split's start."""
    shard = index.shards[number]
    view = view_of(index, 0)
    fields = tuple(required if required is not None else index.schema)
    if view is not None:
        fields = tuple(view.raw_fields(f) for f in fields)
    source = ShardSource(index.shard_url(shard, shard_base), shard.count, shard.offsets, index.seek_every)
    first = sum(s.count for s in index.shards[:number])
    for offset, (raw, problem) in enumerate(read_shard(source, 0, fields)):
        if raw is None:
            yield None, problem
            continue
        try:
            if view is not None:
                raw = view(raw, first + offset)
            yield decode(raw, first + offset), ""
        except Exception as exn:  # noqa: BLE001 - a sample that fails to decode is a counted skip
            yield None, f"sample {raw.get('__key__')} in {source.url}: {exn!r}"
