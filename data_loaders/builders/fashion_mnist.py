"""Fashion-MNIST (60k train / 10k test, 28x28 grey) with captions from the class names."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scaleyard.data_loaders.builders import Split, require_file

SOURCE = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
CAPTION_TEMPLATES = (
    "a photo of {article} {name}",
    "{article} {name}",
    "a grey {name}",
    "a picture of {article} {name}",
    "a black and white photo of {article} {name}",
    "a product photo of {article} {name}",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """IDX files: a magic number whose last byte is the rank, one big-endian uint32 per dimension,
    then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


def idx_count(path: Path) -> int | None:
    """The first dimension from an IDX header (for the progress bar); None when the file is absent."""
    if not path.exists():
        return None
    with gzip.open(path) as handle:
        return int.from_bytes(handle.read(8)[4:8], "big")


def caption(label: int, position: int) -> tuple[str, int]:
    name = CLASS_NAMES[label]
    template = position % len(CAPTION_TEMPLATES)
    article = "an" if name[0] in "aeiou" else "a"
    return CAPTION_TEMPLATES[template].format(article=article, name=name), template


def splits(limit: int | None = None, source: str = str(SOURCE)) -> list[Split]:
    root = Path(source)
    out = []
    for split, (images_file, labels_file) in FILES.items():

        def samples(images_file: str = images_file, labels_file: str = labels_file) -> Iterator[dict[str, Any]]:
            images = read_idx(require_file(root / images_file, "dataset-fashion-mnist", INSTALL))
            labels = read_idx(require_file(root / labels_file, "dataset-fashion-mnist", INSTALL))
            count = len(labels) if limit is None else min(limit, len(labels))
            for i in range(count):
                label = int(labels[i])
                text, template = caption(label, i)
                yield {
                    "__key__": f"{i:06d}",
                    "image.npy": np.ascontiguousarray(images[i]),
                    "cls": label,
                    "txt": text,
                    "json": {"label": label, "class_name": CLASS_NAMES[label], "template": template},
                }

        out.append(
            Split(
                split,
                samples,
                schema={"image.npy": "uint8[28,28]", "cls": "int", "txt": "caption", "json": "label meta"},
                extra={"class_names": list(CLASS_NAMES), "image_shape": [1, 28, 28]},
                size=None if (count := idx_count(root / labels_file)) is None else min(count, limit or count),
            )
        )
    return out
