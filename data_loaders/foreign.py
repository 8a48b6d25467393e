"""Shards written elsewhere (img2dataset-style `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`, `KEY.cls`)
seen through the field names scaleyard's jobs read.

The jobs read `image.npy` (a uint8 [H, W, C] array), `txt` (caption bytes), `cls` and `json`, the
fields scaleyard's builders write. An index made by `scaleyard data index` records a view (which
members hold the image, where the caption comes from, the resolution and crop) in `extra.view`;
the reader applies it to each raw sample before the job's decoders, so every job that reads those
fields trains on foreign shards unchanged, and the shards themselves are never rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from scaleyard.data_loaders.images import CROPS, decode_image
from scaleyard.data_loaders.index import DataError, ShardIndex

IMAGE_FIELD = "image.npy"  # the field name scaleyard's image decoders read
CAPTION_FIELD = "txt"
_CROP_STREAM = 4  # keeps the crop RNG apart from the reader's and the decoders' streams


@dataclass(frozen=True)
class ForeignView:
    """Raw foreign sample -> sample with scaleyard's fields. `caption` is a member extension
    ("txt") or "json:KEY" (a field of the sample's JSON)."""

    image_fields: tuple[str, ...]
    size: int
    crop: str = "center"
    caption: str = "txt"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DataError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.size <= 0:
            raise DataError(f"image size must be positive, got {self.size}")

    @property
    def caption_member(self) -> str:
        return "json" if self.caption.startswith("json:") else self.caption

    def raw_fields(self, field: str) -> str:
        """The raw members that provide one of scaleyard's fields, as the reader's required-field
        check takes them ("jpg|png|webp": any one of them)."""
        if field == IMAGE_FIELD:
            return "|".join(self.image_fields)
        if field == CAPTION_FIELD:
            return self.caption_member
        return field

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        member = next((f for f in self.image_fields if f in raw), None)
        if member is None:
            raise DataError(f"no image member ({'|'.join(self.image_fields)})")
        rng = np.random.default_rng([self.seed, position, _CROP_STREAM]) if self.crop == "random" else None
        out = dict(raw)
        out[IMAGE_FIELD] = decode_image(raw[member], self.size, self.crop, rng)
        if self.caption.startswith("json:"):
            key = self.caption[len("json:"):]
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict) or meta.get(key) is None:
                raise DataError(f"its json has no caption field {key!r}")
            out[CAPTION_FIELD] = str(meta[key]).encode("utf-8")
        return out

    def describe(self) -> dict[str, Any]:
        """The view as the index stores it (`extra.view`); the seed comes from the run."""
        return {"image_fields": list(self.image_fields), "size": self.size, "crop": self.crop,
                "caption": self.caption}


def view_of(index: ShardIndex, seed: int) -> ForeignView | None:
    """The view recorded in an index, or None for shards scaleyard wrote itself."""
    spec = index.extra.get("view")
    if not spec:
        return None
    try:
        return ForeignView(tuple(spec["image_fields"]), int(spec["size"]), spec.get("crop", "center"),
                           spec.get("caption", "txt"), seed)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{index.root}/index.json has a malformed extra.view ({err!r}); "
                        "index the shards again with `scaleyard data index SOURCE --out DIR --force`") from err
