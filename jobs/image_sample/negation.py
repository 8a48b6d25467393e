"""The safe denoiser's negation set: images of a split that match a selection (e.g. every red
shape, `color=red`, from the samples' json; or one Fashion-MNIST class, `label=3`)."""

from __future__ import annotations

from pathlib import Path

import torch

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, JsonDecoder, LabelDecoder, image_member
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import first_samples
from scaleyard.platform.config import ConfigError


def parse_select(text: str, key: str = "safe.select") -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ConfigError(f"config key '{key}': {text!r} is not FIELD=VALUE (e.g. color=red for shapes, "
                          "label=3 for Fashion-MNIST)")
    return name.strip(), value.strip()


def check_negation(path: str, select: str) -> None:
    """Everything about the negation set that can be checked before sampling starts."""
    if not (Path(path) / "index.json").exists():
        raise ConfigError(f"config key 'safe.negation': {path} holds no index.json; give a split folder of image "
                          "shards (e.g. data/shapes16/test)")
    index = load_index(path)
    if not any(f in index.schema for f in ("image.npy", "image.png")):
        raise ConfigError(f"config key 'safe.negation': {path} holds no images (schema: {', '.join(index.schema)})")
    if select:
        field, _ = parse_select(select)
        source = "cls" if field == "label" else "json"
        if source not in index.schema:
            raise ConfigError(f"config key 'safe.select': {path} has no {source!r} member to select {field!r} from "
                              f"(schema: {', '.join(index.schema)})")


def load_negation(path: str, select: str, limit: int, scan: int = 20_000) -> torch.Tensor:
    """Up to `limit` selected images of the split, in [-1, 1] as the sampler's data, [M, C, H, W]."""
    check_negation(path, select)
    return load_selected(path, select, limit, scan=scan)


def load_selected(path: str, select: str, limit: int, outside: bool = False, scan: int = 20_000) -> torch.Tensor:
    """Up to `limit` images of the split that match `select` (with `outside`: that do not), in
    [-1, 1], [M, C, H, W]."""
    index = load_index(path)
    image_field = image_member(index.schema) or "image.png"
    parts: list = [ImageDecoder(field=image_field, symmetric=True)]
    field, value = parse_select(select) if select else ("", "")
    if field == "label":
        parts.append(LabelDecoder())
    elif field:
        parts.append(JsonDecoder())
    chosen: list[torch.Tensor] = []
    for batch in first_samples(index, Compose(tuple(parts)), scan, 256):
        if field == "label":
            keep = [int(label) == int(value) for label in batch["label"]]
        elif field:
            keep = [str(meta.get(field)) == value for meta in batch["meta"]]
        else:
            keep = [True] * len(batch["image"])
        keep = [kept != outside for kept in keep]
        chosen.extend(image for image, kept in zip(batch["image"], keep) if kept)
        if len(chosen) >= limit:
            break
    if not chosen:
        which = "lies outside" if outside else "matches"
        raise ConfigError(f"config key 'safe.select': no image of {path} {which} {select!r} in its first {scan} "
                          "samples")
    return torch.stack(chosen[:limit])
