"""An ordinary map-style dataset (anything sized and indexable, e.g. a `torch.utils.data.Dataset`)
as a resumable training stream with the same guarantees as `ShardStream`.

The global order of epoch e is a permutation of the dataset's indices drawn from (seed, e). Step
k consumes the global positions [k*B, (k+1)*B) of the endless sequence epoch 0, epoch 1, ...
(B = global batch); rank r takes the positions p with p % world_size == r. So the sequence does not
depend on the world size, every sample is seen once per epoch, and `state_dict()` (the next global
position) resumes exactly, on any world size that divides the global batch.

Why not torch's DistributedSampler: it pads or drops to split each epoch evenly and its split
depends on the world size, and it has no position to resume from inside an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import default_collate as torch_default_collate

_ORDER_STREAM = 3  # keeps this RNG stream apart from the shard reader's


def is_map_style(source: Any) -> bool:
    """Sized and indexable, and not already a stream the platform can resume."""
    return (hasattr(source, "__len__") and hasattr(source, "__getitem__")
            and not hasattr(source, "state_dict"))


class DatasetStream:
    """Batches of one rank from a map-style dataset, starting at a global sample position."""

    def __init__(self, dataset: Any, *, batch_per_rank: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 collate: Callable[[list[Any]], Any] | None = None, num_workers: int = 0, start: int = 0):
        size = len(dataset)
        if size == 0:
            raise ValueError(f"the training dataset ({type(dataset).__name__}) is empty")
        self.dataset, self.size = dataset, size
        self.batch_per_rank, self.rank, self.world_size = batch_per_rank, rank, world_size
        self.seed, self.collate, self.num_workers = seed, collate or torch_default_collate, num_workers
        self.position = start

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"global_index": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["global_index"])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).permutation(self.size)

    def batch_indices(self, start: int) -> Iterator[list[int]]:
        """Dataset indices of this rank's batches, from global position `start` on."""
        cached_epoch, order = -1, None
        position = start
        while True:
            indices = []
            for p in range(position + self.rank, position + self.global_batch, self.world_size):
                epoch, offset = divmod(p, self.size)
                if epoch != cached_epoch:
                    cached_epoch, order = epoch, self._epoch_order(epoch)
                indices.append(int(order[offset]))
            yield indices
            position += self.global_batch

    def __iter__(self) -> Iterator[Any]:
        # The batch sampler is a pure function of the start position, so the loader's workers may
        # prefetch freely: the position only advances when a batch is handed over. A private
        # generator keeps the loader from drawing its seed from the global RNG (resume stays exact).
        loader = DataLoader(self.dataset, batch_sampler=_Batches(self, self.position), num_workers=self.num_workers,
                            collate_fn=self.collate, generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            self.position += self.global_batch
            yield batch


class _Batches:
    """An endless batch sampler (DataLoader wants an iterable of index lists)."""

    def __init__(self, stream: DatasetStream, start: int):
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[int]]:
        return self.stream.batch_indices(self.start)
