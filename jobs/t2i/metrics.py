"""Image-generation metrics in the feature space of the `classify` job's network: a Frechet
distance (the FID recipe, with this dataset's own classifier in place of Inception) and caption
accuracy (the share of samples the classifier reads back as the captioned class)."""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) over feature rows."""
    from scipy import linalg  # here: every process that lists the jobs imports this module

    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(cov_r @ cov_f)  # may warn and hold inf/nan when the product is near-singular
    if not np.isfinite(root).all():  # near-singular product: regularise as the FID reference code does
        offset = np.eye(len(cov_r)) * 1e-6
        root = linalg.sqrtm((cov_r + offset) @ (cov_f + offset))
    root = root.real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * root))


@torch.no_grad()
def classifier_readout(classifier: torch.nn.Module, images: torch.Tensor,
                       batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features, predicted classes) of images in [0, 1]."""
    features, classes = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        hidden = classifier.features(chunk)
        features.append(hidden.float().cpu().numpy())
        classes.append(classifier.out(hidden).argmax(-1).cpu().numpy())
    return np.concatenate(features), np.concatenate(classes)
