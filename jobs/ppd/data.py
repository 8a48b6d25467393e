"""PPD examples as the job reads them from `ppd_pairs` shards, and user pairs from request files.

A training item: preferred and dispreferred images in [-1, 1] (what the diffusion loss sees), the
prompt, and the first `context_pairs` context pairs of the same user in [0, 1] (what the frozen
reader, and so the user encoder, sees) as [N, 2, C, H, W].
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import first_samples
from scaleyard.platform.config import ConfigError


def _image(payload: bytes) -> torch.Tensor:
    """PNG bytes -> float [C, H, W] in [0, 1]."""
    array = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float().div_(255.0)


def split_strip(strip: torch.Tensor, pairs: int) -> torch.Tensor:
    """A context strip [C, H, 2 * shots * W] -> its first `pairs` pairs [pairs, 2, C, H, W]."""
    c, h, width = strip.shape
    images = strip.unflatten(2, (width // h, h)).permute(2, 0, 1, 3)  # [2 * shots, C, H, W]
    return images[: 2 * pairs].unflatten(0, (pairs, 2))


@dataclass(frozen=True)
class PairDecoder:
    context_pairs: int

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        meta = json.loads(raw["json"])
        return {"preferred": _image(raw["preferred.png"]).mul_(2).sub_(1),
                "dispreferred": _image(raw["dispreferred.png"]).mul_(2).sub_(1),
                "context": split_strip(_image(raw["context.png"]), self.context_pairs),
                "prompt": meta["prompt"], "user": meta["user"], "margin": torch.tensor(float(meta["margin"])),
                "persona": meta["persona"]}


def heldout_users(path: str, context_pairs: int, count: int) -> list[dict[str, Any]]:
    """The first `count` users of a split (in user order): persona and the context pairs of the
    user's first example."""
    index = load_index(path)
    users: dict[str, dict[str, Any]] = {}
    for batch in first_samples(index, PairDecoder(context_pairs), index.total, 64):
        for user, persona, context in zip(batch["user"], batch["persona"], batch["context"]):
            users.setdefault(user, {"user": user, "persona": persona, "context": context})
    return [users[u] for u in sorted(users)[:count]]


def read_pairs_request(path: str, context_pairs: int) -> dict[str, Any]:
    """`scaleyard sample RUN --known REQUEST.json`: {"prompt": "...", "pairs": [{"preferred": PNG,
    "dispreferred": PNG}, ...]} (image paths relative to the file). Checked before a model loads."""
    file = Path(path) if path else None
    if file is None or not file.exists():
        raise ConfigError('--known FILE: a JSON file {"prompt": "...", "pairs": [{"preferred": "a.png", '
                          '"dispreferred": "b.png"}, ...]} with the new user\'s example pairs')
    try:
        request = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--known {path}: not JSON ({err})") from None
    pairs = request.get("pairs") if isinstance(request, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and {"preferred", "dispreferred"} <= set(p)
                                              for p in pairs):
        raise ConfigError(f'--known {path}: needs "pairs": a list of {{"preferred", "dispreferred"}} image paths')
    if len(pairs) < context_pairs:
        raise ConfigError(f"--known {path}: the user has {len(pairs)} pairs; this run was trained with "
                          f"model.context_pairs={context_pairs}")
    images = []
    for pair in pairs[:context_pairs]:
        for key in ("preferred", "dispreferred"):
            image_path = file.parent / pair[key]
            if not image_path.exists():
                raise ConfigError(f"--known {path}: image {image_path} does not exist")
            images.append(_image(image_path.read_bytes()))
    return {"prompt": str(request.get("prompt", "")), "context": torch.stack(images).unflatten(0, (context_pairs, 2))}
