"""Per-modality decoding (raw shard bytes -> tensors) and batching.

Decoders run inside DataLoader workers and receive the sample's global position, so any
per-sample randomness (a flip) is a function of (seed, position) and replays exactly on resume.
They are small classes rather than closures so that worker processes can pickle them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


def _array(payload: bytes | np.ndarray, field: str) -> np.ndarray:
    if isinstance(payload, np.ndarray):  # already decoded (shards written elsewhere, see foreign.py)
        return payload
    if field.endswith(".npy"):
        return np.load(io.BytesIO(payload), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(payload)))


# members of latent shards written by `scaleyard data encode` (jobs/latent_encode)
LATENT_FIELD = "latent.npy"
TEXT_EMBEDDING_FIELD = "text_emb.npy"


def image_member(schema: dict[str, str]) -> str:
    """The member holding a split's images: the uint8 array scaleyard writes (or a foreign
    shard's view provides), else PNG bytes; "" when the split holds neither."""
    return next((name for name in ("image.npy", "image.png") if name in schema), "")


@dataclass(frozen=True)
class ImageDecoder:
    """uint8 image (npy or any PIL format) -> float tensor [C, H, W] in [0, 1] (or [-1, 1])."""

    field: str = "image.npy"
    flip: bool = False
    symmetric: bool = False  # diffusion models want [-1, 1]
    seed: int = 0

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        array = _array(raw[self.field], self.field)
        if array.ndim == 2:
            array = array[None]
        else:
            array = np.moveaxis(array, -1, 0)
        if self.flip and np.random.default_rng([self.seed, position]).random() < 0.5:
            array = array[..., ::-1]
        image = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
        if self.symmetric:
            image = image.mul_(2.0).sub_(1.0)
        return {"image": image}


@dataclass(frozen=True)
class LatentDecoder:
    """Cached autoencoder latents (`scaleyard data encode`) -> float32 tensor [C, h, w], as the
    "image" a diffusion model trains on (already normalised by the autoencoder's factors)."""

    field: str = "latent.npy"

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(_array(raw[self.field], ".npy").astype(np.float32))}


@dataclass(frozen=True)
class LabelDecoder:
    field: str = "cls"

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        return {"label": torch.tensor(int(raw[self.field]), dtype=torch.long)}


@dataclass(frozen=True)
class CaptionDecoder:
    """Raw caption text, plus a cached text-encoder embedding when the shards carry one."""

    field: str = "txt"
    # e.g. "text_emb.npy" from `scaleyard data encode`: the caption's n real token embeddings [n, D],
    # padded here with zeros to `embedding_len` (mask False), as the encoder's own output is
    embedding_field: str = ""
    embedding_len: int = 0

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        out: dict[str, Any] = {"caption": raw[self.field].decode("utf-8")}
        if self.embedding_field:
            tokens = torch.from_numpy(_array(raw[self.embedding_field], ".npy").astype(np.float32))
            length = max(self.embedding_len, len(tokens))
            out["caption_embedding"] = torch.nn.functional.pad(tokens, (0, 0, 0, length - len(tokens)))
            out["caption_mask"] = torch.arange(length) < len(tokens)
        return out


@dataclass(frozen=True)
class JsonDecoder:
    field: str = "json"

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        return {"meta": json.loads(raw[self.field])}


@dataclass(frozen=True)
class MoleculeDecoder:
    """Atomic numbers and coordinates of one molecule (variable atom count); see `pad_molecules`."""

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        return {
            "atoms": torch.from_numpy(_array(raw["atoms.npy"], ".npy")),
            "pos": torch.from_numpy(_array(raw["pos.npy"], ".npy")),
            "smiles": raw["smiles.txt"].decode("utf-8"),
            "properties": json.loads(raw["json"]),
        }


@dataclass(frozen=True)
class TableDecoder:
    """One table row -> numeric values and category indices, following the dataset schema
    (`extra.columns` of the index: name, kind, categories)."""

    columns: tuple[dict[str, Any], ...]

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        row = json.loads(raw["json"])
        numeric = [float(row[c["name"]]) for c in self.columns if c["kind"] == "numerical"]
        categorical = []
        for column in self.columns:
            if column["kind"] != "categorical":
                continue
            value = row[column["name"]]
            try:
                categorical.append(column["categories"].index(value))
            except ValueError:
                raise ValueError(f"column {column['name']!r} has value {value!r} outside its schema") from None
        return {
            "numeric": torch.tensor(numeric, dtype=torch.float32),
            "categorical": torch.tensor(categorical, dtype=torch.long),
        }


@dataclass(frozen=True)
class Compose:
    """Several decoders over the same raw sample, their outputs merged."""

    parts: tuple[Any, ...]

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        out: dict[str, Any] = {"position": position, "key": raw["__key__"]}
        for part in self.parts:
            out.update(part(raw, position))
        return out


def pad_molecules(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch molecules of different sizes: atoms [B, N], pos [B, N, 3], mask [B, N] (True = atom)."""
    width = max(len(s["atoms"]) for s in samples)
    atoms = torch.zeros(len(samples), width, dtype=torch.long)
    pos = torch.zeros(len(samples), width, 3)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, sample in enumerate(samples):
        n = len(sample["atoms"])
        atoms[i, :n], pos[i, :n], mask[i, :n] = sample["atoms"], sample["pos"], True
    return {
        "atoms": atoms, "pos": pos, "mask": mask,
        "smiles": [s["smiles"] for s in samples],
        "properties": [s["properties"] for s in samples],
        "position": torch.tensor([s["position"] for s in samples]) if "position" in samples[0] else None,
    }  # fmt: skip
