"""The global sample order of an epoch, computed from the index alone (no data is read).

Why not webdataset's own shuffling and splitting: its order depends on how shards are divided
among nodes and workers, and its iterators have no state to resume from (webdataset #271). A run
that is preempted, or resumed on a different number of ranks, must see the same global sequence.

The order, for epoch e:
1. shards are permuted with an RNG seeded by (seed, e) and laid end to end (the flat order);
2. the flat sequence of N samples is cut into `lanes` contiguous lanes of near-equal length;
3. inside each lane, blocks of `shuffle_block` consecutive samples are permuted (the bounded
   shuffle, seeded by (seed, e, lane, block));
4. the global order interleaves the lanes row by row: global position g is sample g // lanes
   of lane g % lanes (this also holds for the short last row).
A lane is read sequentially from its shards, so a reader owning a lane touches only the shards
it needs. Lane l belongs to rank l % world_size, so with `lanes` a multiple of the world size
rank r owns exactly the global positions g with g % world_size == r: the order does not depend
on the world size, and each rank's share of a global batch is known without reading anything.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from scaleyard.data_loaders.index import ShardIndex

_SHARD_STREAM, _BLOCK_STREAM = 1, 2  # keep the RNG streams of the two shuffles apart


@dataclass(frozen=True)
class OrderSpec:
    counts: tuple[int, ...]  # samples per shard, in index order
    seed: int
    lanes: int
    shuffle_block: int

    @classmethod
    def from_index(cls, index: ShardIndex, seed: int, lanes: int, shuffle_block: int) -> OrderSpec:
        return cls(tuple(s.count for s in index.shards), seed, lanes, shuffle_block)

    @property
    def total(self) -> int:
        return sum(self.counts)


class EpochOrder:
    def __init__(self, spec: OrderSpec, epoch: int):
        self.spec = spec
        self.epoch = epoch
        rng = np.random.default_rng([spec.seed, epoch, _SHARD_STREAM])
        self.shard_order = rng.permutation(len(spec.counts)).tolist()
        counts = [spec.counts[s] for s in self.shard_order]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.total = spec.total
        self.lane_base, self.lane_extra = divmod(self.total, spec.lanes)

    def lane_start(self, lane: int) -> int:
        return lane * self.lane_base + min(lane, self.lane_extra)

    def lane_length(self, lane: int) -> int:
        return self.lane_base + (1 if lane < self.lane_extra else 0)

    def locate(self, flat: int) -> tuple[int, int]:
        """(position in this epoch's shard order, offset inside that shard) of a flat position."""
        slot = bisect.bisect_right(self.shard_starts, flat) - 1
        return slot, flat - self.shard_starts[slot]

    def block_permutation(self, lane: int, block: int, length: int) -> list[int]:
        rng = np.random.default_rng([self.spec.seed, self.epoch, _BLOCK_STREAM, lane, block])
        return rng.permutation(length).tolist()

    @cached_property
    def rows(self) -> int:
        return self.lane_base + (1 if self.lane_extra else 0)


def owner_rank(global_position: int, total: int, world_size: int) -> int:
    """Rank that reads a global position (valid when lanes % world_size == 0)."""
    return (global_position % total) % world_size


def count_owned(start: int, stop: int, rank: int, total: int, world_size: int) -> int:
    """How many global positions in [start, stop) belong to `rank`."""
    return sum(1 for g in range(start, stop) if owner_rank(g, total, world_size) == rank)


def lanes_of(rank: int, world_size: int, worker: int, num_workers: int, lanes: int) -> list[int]:
    """Lanes read by one worker of one rank: ranks take lanes round-robin, then each rank's
    lanes are dealt round-robin to its workers."""
    mine = list(range(rank, lanes, world_size))
    return mine[worker::num_workers]
