"""A small img2dataset-style folder, drawn with PIL (nothing downloaded): shards `00000.tar`, ...
holding `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json` (and `KEY.cls`), images of odd sizes and every
awkward mode (L, P with transparency, RGBA, CMYK, 16-bit grey), one truncated JPEG and one sample
without a caption, plus the `_stats.json` files img2dataset leaves beside its shards.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

# (format, mode, width, height), cycled over the samples
KINDS = (
    ("JPEG", "RGB", 97, 61), ("PNG", "RGBA", 40, 75), ("WEBP", "RGB", 64, 64), ("JPEG", "L", 33, 50),
    ("PNG", "P", 51, 29), ("JPEG", "CMYK", 70, 44), ("PNG", "I;16", 45, 45), ("WEBP", "RGBA", 38, 90),
    ("PNG", "L", 120, 31), ("JPEG", "RGB", 300, 200),
)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ForeignFolder:
    root: Path
    shards: list[Path]
    counts: list[int]
    corrupt: list[str] = field(default_factory=list)  # "KEY.ext" of the truncated image
    uncaptioned: list[str] = field(default_factory=list)  # keys without a .txt

    @property
    def total(self) -> int:
        return sum(self.counts)


def draw(kind: tuple[str, str, int, int], rng: np.random.Generator) -> bytes:
    fmt, mode, width, height = kind
    ramp = np.linspace(0, 1, width)[None, :] * np.linspace(0.3, 1, height)[:, None]
    noise = rng.random((height, width))
    if mode == "I;16":
        image = Image.fromarray((ramp * 60000 + noise * 5000).astype(np.uint16))
    else:
        rgb = np.stack([ramp, noise, 1 - ramp], -1)
        image = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
        if mode == "RGBA":
            image.putalpha(Image.fromarray((ramp * 255).astype(np.uint8)))
        elif mode == "P":
            image = image.quantize(16)
            image.info["transparency"] = 0
        else:
            image = image.convert(mode)
    buffer = io.BytesIO()
    options = {"transparency": 0} if mode == "P" else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def make_foreign_folder(root: Path, shards: int = 3, per_shard: int = 20, seed: int = 0) -> ForeignFolder:
    """Shards as img2dataset writes them: key = shard number (5 digits) + sample number (4)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    folder = ForeignFolder(root, [], [])
    number = 0
    for shard in range(shards):
        path = root / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                kind = KINDS[number % len(KINDS)]
                payload = draw(kind, rng)
                ext = EXTENSIONS[kind[0]]
                caption = f"a {kind[1]} {kind[0].lower()} picture number {number}"
                sample = {"__key__": key, ext: payload,
                          "json": json.dumps({"caption": caption, "key": key, "width": kind[2], "height": kind[3],
                                              "status": "success"}).encode(), "cls": str(number % 3).encode()}
                if number == 7:  # a download cut short: the JPEG header is fine, the pixels are not
                    sample = {"__key__": key, "jpg": draw(KINDS[9], rng)[:900], "json": sample["json"],
                              "cls": sample["cls"]}
                    folder.corrupt.append(f"{key}.jpg")
                if number != 12:
                    sample["txt"] = caption.encode()
                else:
                    folder.uncaptioned.append(key)
                sink.write(sample)
                number += 1
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        folder.shards.append(path)
        folder.counts.append(per_shard)
    return folder
