"""Procedurally drawn shapes with compositional captions, at any resolution.

Each image holds 1-3 shapes of one kind and colour; the caption names the count, size, colour,
shape and (for a single shape) its position, and the sample's json holds the same attributes so
that evaluation can check what a generator drew against what it was asked for.

Option `partial_captions=P` leaves each of count, size, colour and position out of a caption with
probability P ("large circle shapes", "a red circle"), so a model trained on them can be prompted
with attributes left open (the PPD job's users prefer values of the attributes a prompt does not
fix). Those draws come from their own RNG: the images and the default captions do not change.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from scaleyard.data_loaders.builders import Split

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 130, 20), "white": (240, 240, 240),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.3}
POSITIONS = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}  # fmt: skip
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
DEFAULT_SIZES = {"train": 50_000, "test": 5_000}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, color) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=color)


def caption(attributes: dict[str, Any], keep: dict[str, bool] | None = None) -> str:
    """The caption of a sample's attributes; `keep` (attribute -> bool) leaves some out. Without a
    count the noun is "<shape> shapes", which says nothing about how many there are."""
    keep = keep or {}
    count, shape = attributes["count"], attributes["shape"]
    words = [attributes[a] for a in ("size", "color") if keep.get(a, True)]
    if not keep.get("count", True):
        text = " ".join([*words, f"{shape} shapes"])
    elif count == 1:
        text = " ".join(["a", *words, shape])
    else:
        text = " ".join([COUNT_WORDS[count], *words, f"{shape}s"])
    if attributes["position"] is not None and keep.get("position", True) and keep.get("count", True):
        text += f" at the {attributes['position']}"
    return text


PARTIAL = ("count", "size", "color", "position")  # what a partial caption may leave out


def make_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str, dict[str, Any]]:
    count = int(rng.integers(1, 4))
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    radius = SIZES[size] * resolution / 2
    if count == 1:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        centers = [POSITIONS[position]]
    else:
        position = None
        slots = rng.permutation(len(POSITIONS))[:count]
        centers = [list(POSITIONS.values())[s] for s in slots]
    image = Image.new("RGB", (resolution, resolution), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for cx, cy in centers:
        draw_shape(draw, shape, cx * resolution, cy * resolution, radius, COLORS[color])
    attributes = {"count": count, "shape": shape, "color": color, "size": size, "position": position}
    return np.asarray(image), caption(attributes), attributes


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def splits(limit: int | None = None, resolution: int = 32, seed: int = 0, partial_captions: float = 0.0) -> list[Split]:
    if resolution < 8:
        raise ValueError(f"shapes resolution must be at least 8 pixels, got {resolution}")
    if not 0.0 <= partial_captions <= 1.0:
        raise ValueError(f"shapes option partial_captions={partial_captions}: a probability in [0, 1]")
    out = []
    for split_number, (split, default_count) in enumerate(DEFAULT_SIZES.items()):

        def samples(split_number: int = split_number, default_count: int = default_count) -> Iterator[dict]:
            count = default_count if limit is None else min(limit, default_count)
            rng = np.random.default_rng([seed, split_number])
            drop_rng = np.random.default_rng([seed, split_number, 1])  # its own stream: images stay the same
            for i in range(count):
                image, text, attributes = make_sample(rng, resolution)
                if partial_captions > 0:
                    text = caption(attributes, {a: bool(drop_rng.random() >= partial_captions) for a in PARTIAL})
                yield {"__key__": f"{i:06d}", "image.png": png_bytes(image), "txt": text, "json": attributes}

        out.append(
            Split(
                split,
                samples,
                schema={"image.png": f"uint8[{resolution},{resolution},3] PNG", "txt": "caption",
                        "json": "attributes"},
                extra={"image_shape": [3, resolution, resolution], "shapes": list(SHAPES),
                       "colors": list(COLORS), "sizes": list(SIZES), "positions": list(POSITIONS)},
                size=default_count if limit is None else min(limit, default_count),
            )
        )
    return out
