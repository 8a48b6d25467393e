"""autoencoder: a small KL autoencoder for latent diffusion, trained on any image shards.

Recipe: config -> data (image shards: shapes, Fashion-MNIST, or shards indexed with `scaleyard
data index`) -> model (diffusers' AutoencoderKL in one of models/autoencoder.py's presets) ->
loss (L1 reconstruction + a small KL term, Stable Diffusion's balance) -> evaluation (PSNR of
reconstructions, the latents' mean and spread, Frechet distance in the `classify` network's
feature space when given one) -> `scaleyard export RUN --format diffusers`: a folder that
`data encode --autoencoder` and `t2i model.autoencoder` load exactly like an SD/FLUX VAE.

This is the offline path: on a cluster a pretrained VAE folder replaces it. The adversarial and
perceptual (LPIPS) losses of SD's VAE training are left out: LPIPS needs downloaded VGG weights,
and at 64 px a PSNR-driven autoencoder is what the latent pipeline needs to be exercised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, image_member
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, first_samples, stack
from scaleyard.jobs.t2i.metrics import classifier_readout, frechet_distance
from scaleyard.models.autoencoder import (
    AUTOENCODER_PRESETS,
    autoencoder_kl_config,
    build_autoencoder_kl,
    diffusers_missing,
)
from scaleyard.platform.config import (
    ConfigError,
    DataConfig,
    TrainingConfig,
    batch_per_rank,
    bounded,
    choice,
    stream_config,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts

GRID = 8  # originals beside their reconstructions in TensorBoard


@dataclass
class ModelConfig:
    preset: str = choice("kl-f4-s", tuple(AUTOENCODER_PRESETS))
    latent_channels: int = bounded(4, 1)
    # weight of the KL term per latent value against L1 per pixel (SD's VAE: 1e-6 with both summed)
    kl_weight: float = bounded(1e-6, 0.0)


@dataclass
class EvalConfig:
    samples: int = bounded(512, 0)  # eval images reconstructed for PSNR (0: no evaluation)
    batch_size: int = bounded(64, 1)
    classifier: str = ""  # a `classify` run on images of this geometry: adds Frechet distance


@dataclass
class ExportConfig:
    # training images encoded at export to set scaling_factor = 1 / std and shift_factor = mean of
    # the latents (the convention of SD's 0.18215 and FLUX's shift), so diffusion sees unit variance
    stats_samples: int = bounded(1024, 1)


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/shapes64/train",
                                                                 eval_path="data/shapes64/test"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


class KLAutoencoderLoss(nn.Module):
    """The autoencoder behind one forward returning its loss terms, so DDP/ZeRO see the whole
    trainable call. State-dict keys are `vae.*`: the diffusers model's own under a prefix."""

    def __init__(self, vae: nn.Module, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator)).sample
        l1 = (reconstruction - images).abs().mean()
        pixels = images[0].numel()
        kl = posterior.kl().mean() / pixels  # per-sample KL summed over latents, per pixel like the L1
        return {"loss": l1 + self.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach() * pixels}


def image_field(schema: dict[str, str]) -> str:
    return image_member(schema) or "image.png"


class LatentMoments:
    """Running mean and standard deviation of every latent value seen (float64 sums)."""

    def __init__(self) -> None:
        self.total, self.squares, self.values = 0.0, 0.0, 0

    def add(self, z: torch.Tensor) -> None:
        z = z.double()
        self.total += float(z.sum())
        self.squares += float(z.pow(2).sum())
        self.values += z.numel()

    def mean_std(self) -> tuple[float, float]:
        mean = self.total / self.values
        return mean, math.sqrt(max(self.squares / self.values - mean**2, 1e-12))


class AutoencoderJob(Job):
    name = "autoencoder"
    Config = Config

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if diffusers_missing():
            raise ConfigError(f"config key 'model.preset': {diffusers_missing()}")
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to an image split folder with index.json "
                              "(`scaleyard data build shapes --out data/shapes64 --option resolution=64`)")

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        index = load_index(cfg.data.path)
        self.field = image_field(index.schema)
        self.image_shape = list(index.extra.get("image_shape") or [3])
        downsample = 2 ** (len(AUTOENCODER_PRESETS[cfg.model.preset][0]) - 1)
        if len(self.image_shape) == 3 and self.image_shape[-1] % downsample:
            raise ConfigError(f"config key 'model.preset': {cfg.model.preset} downsamples by {downsample}, which "
                              f"does not divide {cfg.data.path}'s {self.image_shape[-1]} px images")
        decode = Compose((ImageDecoder(field=self.field, symmetric=True),))
        stream = ShardStream(index, stream_config(cfg), decode=decode, collate=stack,
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
                             rank=ctx.data_rank, world_size=ctx.data_world_size, required=(self.field,))
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            vae = build_autoencoder_kl(cfg.model.preset, self.image_shape[0], cfg.model.latent_channels)
        self._classifier = None
        return JobParts(model=KLAutoencoderLoss(vae, cfg.model.kl_weight), train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        terms = model(batch["image"].to(self.ctx.device))
        return terms["loss"], {"l1": terms["l1"], "kl": terms["kl"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        cfg = self.cfg
        if not cfg.data.eval_path or cfg.eval.samples == 0:
            return EvalResult()
        classifier = self._load_classifier() if cfg.eval.classifier else None
        psnr_sum, count, moments = 0.0, 0, LatentMoments()
        originals, reconstructions, real_features, fake_features = [], [], [], []
        for batch in eval_images(cfg, self.field, cfg.eval.samples, cfg.eval.batch_size):
            images = batch["image"].to(self.ctx.device)
            z = model.vae.encode(images).latent_dist.mode()
            decoded = model.vae.decode(z).sample.clamp(-1, 1)
            # PSNR on [0, 1] pixels, per image then averaged (the usual reporting)
            per_image = ((decoded - images) / 2).pow(2).flatten(1).mean(1)
            psnr_sum += float((-10 * torch.log10(per_image.clamp_min(1e-10))).sum())
            moments.add(z)
            count += len(images)
            if len(originals) < GRID:
                originals += list(images[: GRID - len(originals)].cpu())
                reconstructions += list(decoded[: GRID - len(reconstructions)].cpu())
            if classifier is not None:  # reconstructions vs originals in the classifier's feature space
                real_features.append(classifier_readout(classifier, (images + 1) / 2)[0])
                fake_features.append(classifier_readout(classifier, (decoded + 1) / 2)[0])
        mean, std = moments.mean_std()
        metrics = {"psnr": psnr_sum / count, "latent_mean": mean, "latent_std": std}
        if classifier is not None:
            metrics["frechet_distance"] = frechet_distance(np.concatenate(real_features), np.concatenate(fake_features))
        pairs = torch.stack([image for pair in zip(originals, reconstructions) for image in pair])
        return EvalResult(metrics=metrics, images={"originals_and_reconstructions": (pairs + 1) / 2})

    def _load_classifier(self) -> nn.Module:
        from scaleyard.jobs.classify.job import load_classifier

        if self._classifier is None:
            self._classifier = load_classifier(self.cfg.eval.classifier, self.ctx.device)
        return self._classifier

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        return 0.0  # convolutions at several resolutions: not counted (no scaling-law use)

    @classmethod
    def export_formats(cls) -> dict[str, str]:
        return {"diffusers": "an AutoencoderKL folder (config.json + safetensors) with the latents' scaling and "
                             "shift measured on the training split; load it as model.autoencoder / --autoencoder"}

    def export(self, fmt: str, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
               out: Path) -> dict[str, Any]:
        from diffusers import AutoencoderKL

        index = load_index(cfg.data.path)
        channels = int((index.extra.get("image_shape") or [3])[0])
        config = autoencoder_kl_config(cfg.model.preset, channels, cfg.model.latent_channels)
        vae = AutoencoderKL(**config)
        vae.load_state_dict({key.removeprefix("vae."): value for key, value in weights.items()})
        vae.eval()
        mean, std = latent_stats(vae, cfg, image_field(index.schema))
        vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
        vae.save_pretrained(str(out), safe_serialization=True)
        stats = {"latent_mean": mean, "latent_std": std, "scaling_factor": 1.0 / std, "shift_factor": mean,
                 "stats_samples": min(cfg.export.stats_samples, index.total)}
        (out / "scaleyard_export.json").write_text(json.dumps({"preset": cfg.model.preset, **stats}, indent=1))
        return stats


@torch.no_grad()
def latent_stats(vae: nn.Module, cfg: DictConfig, field_name: str) -> tuple[float, float]:
    """Mean and standard deviation of the posterior means over the first training images."""
    moments = LatentMoments()
    decode = Compose((ImageDecoder(field=field_name, symmetric=True),))
    for batch in first_samples(load_index(cfg.data.path), decode, cfg.export.stats_samples, 64):
        moments.add(vae.encode(batch["image"]).latent_dist.mode())
    return moments.mean_std()


def eval_images(cfg: DictConfig, field_name: str, count: int, batch: int):
    decode = Compose((ImageDecoder(field=field_name, symmetric=True),))
    return first_samples(load_index(cfg.data.eval_path), decode, count, batch)


JOB = AutoencoderJob
