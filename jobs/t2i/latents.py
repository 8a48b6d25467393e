"""t2i on latent shards (`scaleyard data encode`): what the job reads from a split, and the
autoencoder that turns generated latents back into images for the grid and the metrics.

A latent split's index records the latent shape and the autoencoder folder that made it, so a run
needs only `data.path`; `model.autoencoder` names another copy of the same VAE (e.g. on a node's
local disk). Cached MiniLM embeddings are used when the run's text encoder is MiniLM with the
same token count; otherwise captions are encoded live, as for image shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from scaleyard.data_loaders.decoders import (
    LATENT_FIELD,
    TEXT_EMBEDDING_FIELD,
    CaptionDecoder,
    ImageDecoder,
    LabelDecoder,
    LatentDecoder,
    image_member,
)
from scaleyard.data_loaders.index import ShardIndex
from scaleyard.platform.config import ConfigError


@dataclass(frozen=True)
class SplitGeometry:
    field: str  # the member holding the image or latent
    shape: tuple[int, int, int]  # [C, H, W] the denoiser sees
    latent: bool
    cached_text: bool  # the split carries MiniLM embeddings this run can use


def split_geometry(index: ShardIndex, cfg: DictConfig, text_len: int) -> SplitGeometry:
    if LATENT_FIELD in index.schema:
        shape = tuple(index.extra["latent_shape"])
        cached = index.extra.get("text_encoder") or {}
        usable = (cfg.model.text_encoder == "minilm" and cached.get("name") == "minilm"
                  and int(cached.get("text_len", 0)) == text_len and TEXT_EMBEDDING_FIELD in index.schema)
        return SplitGeometry(LATENT_FIELD, shape, True, usable)
    shape = tuple(index.extra.get("image_shape", [1, 28, 28]))
    return SplitGeometry(image_member(index.schema) or "image.png", shape, False, False)


def decoders(geometry: SplitGeometry, index: ShardIndex, labels: bool = False) -> tuple[Any, ...]:
    image = LatentDecoder(geometry.field) if geometry.latent else ImageDecoder(field=geometry.field, symmetric=True)
    caption = CaptionDecoder()
    if geometry.cached_text:
        caption = CaptionDecoder(embedding_field=TEXT_EMBEDDING_FIELD,
                                 embedding_len=int(index.extra["text_encoder"]["text_len"]))
    parts = [image, caption]
    if labels and "cls" in index.schema:
        parts.append(LabelDecoder())
    return tuple(parts)


def cached_text(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A batch's cached text embeddings and mask (CaptionDecoder), or None: encode live."""
    return (batch["caption_embedding"], batch["caption_mask"]) if "caption_embedding" in batch else None


def autoencoder_folder(cfg: DictConfig, index: ShardIndex) -> str:
    """The VAE that decodes this split's latents: model.autoencoder, else the one the index names."""
    folder = cfg.model.autoencoder or (index.extra.get("autoencoder") or {}).get("path", "")
    if not folder:
        raise ConfigError(f"config key 'model.autoencoder': {index.root} holds latents but its index names no "
                          "autoencoder; give the VAE folder that encoded them")
    return folder


def load_decoder(cfg: DictConfig, index: ShardIndex, device: Any) -> Any:
    """The split's autoencoder, checked against the weights that encoded the latents."""
    from scaleyard.data_loaders.index import sha256_file
    from scaleyard.models.autoencoder import AutoencoderError, check_folder, load_autoencoder

    folder = autoencoder_folder(cfg, index)
    try:
        spec = check_folder(folder)
    except AutoencoderError as err:
        raise ConfigError(f"config key 'model.autoencoder': {err}") from None
    recorded = (index.extra.get("autoencoder") or {}).get("weights_sha256")
    if recorded and sha256_file(spec.weights) != recorded:
        raise ConfigError(f"config key 'model.autoencoder': {spec.weights} is not the autoencoder that encoded "
                          f"{index.root} (sha256 differs from its index.json); give that VAE's folder")
    return load_autoencoder(folder, device)


def run_decoder(cfg: DictConfig, device: Any) -> Any:
    """For sampling a finished run: the autoencoder of its latent training split, or None when it
    trained on images."""
    from pathlib import Path

    from scaleyard.data_loaders.index import INDEX_FILE, load_index

    if not cfg.data.path or not (Path(cfg.data.path) / INDEX_FILE).exists():
        if cfg.model.autoencoder:
            from scaleyard.models.autoencoder import load_autoencoder

            return load_autoencoder(cfg.model.autoencoder, device)
        return None
    index = load_index(cfg.data.path)
    return load_decoder(cfg, index, device) if LATENT_FIELD in index.schema else None
