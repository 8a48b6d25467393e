"""Reading a sampling run's images back with a trained `classify` network: the share of samples
that fall in a region (one class, e.g. the safe denoiser's negated one) and the Frechet distance
of the others to the real images outside that region, in the classifier's feature space (the FID
recipe with this dataset's own classifier, jobs/t2i/metrics.py).

Two sampling runs with the same prompts, seeds and readback settings, one with `safe.negation`
and one without, give the safe denoiser's two numbers side by side (README "Sampling")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from scaleyard.jobs.image_sample.images import read_png
from scaleyard.jobs.image_sample.negation import load_selected, parse_select
from scaleyard.platform.config import ConfigError, bounded


@dataclass
class ReadbackConfig:
    reader: str = ""  # a finished `classify` run; empty: no readback
    region: str = ""  # label=K: the class whose share is reported; empty: safe.select
    real: str = ""  # a split folder of real images (Frechet distance reference); empty: safe.negation
    real_limit: int = bounded(2000, 2)


def region_of(cfg: DictConfig) -> tuple[int, str]:
    """(class, real split) of the readback, or a ConfigError naming the key to set."""
    region = cfg.readback.region or cfg.safe.select
    real = cfg.readback.real or cfg.safe.negation
    if not region:
        raise ConfigError("config key 'readback.region': give the class to count, e.g. readback.region=label=9 "
                          "(or set safe.select)")
    field, value = parse_select(region, "readback.region")
    if field != "label" or not value.lstrip("-").isdigit():
        raise ConfigError(f"config key 'readback.region': {region!r}: a classify reader reads classes; "
                          "give label=K")
    if not real:
        raise ConfigError("config key 'readback.real': give a split folder of real images for the Frechet "
                          "distance (or set safe.negation)")
    if not (Path(real) / "index.json").exists():
        raise ConfigError(f"config key 'readback.real': {real} holds no index.json; give a split folder")
    return int(value), real


def check_readback(cfg: DictConfig) -> None:
    if not cfg.readback.reader:
        return
    if not (Path(cfg.readback.reader) / "checkpoints").exists():
        raise ConfigError(f"config key 'readback.reader': {cfg.readback.reader} holds no checkpoints; "
                          "give a finished `scaleyard run classify` folder")
    region_of(cfg)


@torch.no_grad()
def readback(cfg: DictConfig, samples: list[Path], device: torch.device) -> dict[str, float]:
    """Metrics of the written samples: region share, Frechet distance of the rest."""
    from scaleyard.jobs.classify.job import load_classifier
    from scaleyard.jobs.t2i.metrics import classifier_readout, frechet_distance

    label, real_path = region_of(cfg)
    classifier = load_classifier(cfg.readback.reader, device)
    images = torch.stack([read_png(path) for path in samples]).to(device)
    features, predicted = classifier_readout(classifier, (images + 1) / 2)
    inside = predicted == label
    real = load_selected(real_path, f"label={label}", cfg.readback.real_limit, outside=True).to(device)
    real_features, _ = classifier_readout(classifier, (real + 1) / 2)
    rest = features[~inside]
    metrics = {"readback_images": float(len(samples)), "region_share": float(inside.mean()),
               "real_images": float(len(real))}
    if len(rest) > 1:
        metrics["frechet_distance_rest"] = frechet_distance(real_features, rest)
    return metrics
