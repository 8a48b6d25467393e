"""The t2i image metrics' math (jobs/t2i/metrics.py) against closed forms: the Frechet distance of
feature sets whose statistics are known exactly, and the classifier read-out."""

import numpy as np
import pytest
import torch
from torch import nn

from scaleyard.jobs.t2i.metrics import classifier_readout, frechet_distance


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)  # correlated features
    cov, mu = np.cov(real, rowvar=False), real.mean(0)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    # an affine copy a x + b: covariance a^2 S, so Tr(S + a^2 S - 2 a S) = (1 - a)^2 Tr S
    a, b = 1.7, rng.normal(size=6)
    fake = a * real + b
    expected = ((mu - (a * mu + b)) ** 2).sum() + (1 - a) ** 2 * np.trace(cov)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(fake, real) == pytest.approx(expected, rel=1e-6)  # symmetric
    # whitened samples (sample mean 0, sample covariance exactly I), the fake one scaled per feature
    # and shifted: sum over features of (mu_r - mu_f)^2 + (sigma_r - sigma_f)^2
    white = [whiten(rng.normal(size=(500, 3))) for _ in range(2)]
    scales, shift = np.array([1.0, 2.0, 0.5]), np.array([0.0, 1.0, -3.0])
    expected = (shift ** 2).sum() + ((1.0 - scales) ** 2).sum()
    assert frechet_distance(white[0], white[1] * scales + shift) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(11.25)


def whiten(x):
    centred = x - x.mean(0)
    return centred @ np.linalg.inv(np.linalg.cholesky(np.cov(centred, rowvar=False))).T


def test_classifier_readout_returns_features_and_argmax_in_batches():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(2, 3)
            with torch.no_grad():
                self.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
                self.out.bias.zero_()

        def features(self, images):
            return images.flatten(1)[:, :2]

    images = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -2.0]]).view(3, 1, 1, 2)
    features, classes = classifier_readout(Probe(), images, batch=2)
    assert features.shape == (3, 2) and np.allclose(features, images.view(3, 2).numpy())
    assert classes.tolist() == [0, 1, 2]
