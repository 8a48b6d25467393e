"""Reading QM9 splits for TFG-Flow: atom-type vocabulary, padded batches, whole-split passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaleyard.data_loaders.decoders import Compose, MoleculeDecoder
from scaleyard.data_loaders.index import DataError, ShardIndex
from scaleyard.data_loaders.pipeline import ShardStream, StreamConfig

PROPERTIES = ("alpha", "gap", "homo", "lumo", "mu", "cv")  # the six TFG-Flow targets


def atom_vocabulary(index: ShardIndex) -> list[int]:
    """Atomic numbers the model's type classes stand for (index = class)."""
    numbers = sorted(index.extra.get("atom_types", {}).values())
    if not numbers:
        raise DataError(f"{index.root}/index.json has no atom_types: build it with `scaleyard data build qm9 "
                        "--option heavy_atoms_only=true --option tfg_splits=true`")
    if index.extra.get("heavy_atoms_only"):
        numbers = [z for z in numbers if z != 1]
    return numbers


@dataclass(frozen=True)
class PadBatch:
    """Collate for the training stream (a class: DataLoader workers pickle it)."""

    vocabulary: tuple[int, ...]
    properties: tuple[str, ...] = ()

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad(samples, list(self.vocabulary), self.properties)


def _as_list(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"items": samples}


def read_molecules(index: ShardIndex, count: int) -> list[dict[str, Any]]:
    """The first `count` molecules of a split (0: all) in their fixed stored order."""
    stream = ShardStream(index, StreamConfig(seed=0, lanes=1, shuffle_block=1), decode=Compose((MoleculeDecoder(),)),
                         collate=_as_list, batch_per_rank=256)
    count = index.total if count <= 0 else min(count, index.total)
    out: list[dict[str, Any]] = []
    for batch in stream:
        out.extend(batch["items"][: count - len(out)])
        if len(out) >= count:
            return out
    return out


def to_classes(atoms: torch.Tensor, vocabulary: list[int]) -> torch.Tensor:
    """Atomic numbers -> class indices (padding zeros -> class 0; masked out downstream)."""
    lookup = torch.zeros(max(vocabulary) + 1, dtype=torch.long)
    lookup[torch.tensor(vocabulary)] = torch.arange(len(vocabulary))
    return lookup[atoms]


def pad(molecules: list[dict[str, Any]], vocabulary: list[int],
        properties: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Padded batch: pos [B, N, 3], types [B, N] (classes), mask [B, N], props [B, P]."""
    width = max(len(m["atoms"]) for m in molecules)
    b = len(molecules)
    pos, atoms = torch.zeros(b, width, 3), torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, m in enumerate(molecules):
        n = len(m["atoms"])
        pos[i, :n], atoms[i, :n], mask[i, :n] = m["pos"], m["atoms"], True
    props = torch.tensor([[m["properties"][p] for p in properties] for m in molecules], dtype=torch.float32)
    props = props.reshape(b, len(properties))
    return {"pos": pos, "types": to_classes(atoms, vocabulary), "mask": mask, "props": props}
