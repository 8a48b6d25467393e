"""attributes: a multi-attribute reader of `shapes` images (colour, shape, size, count, position).

Recipe: config -> data (shapes shards: image + json attributes) -> model (models/classifier.py's
ConvClassifier with one logit group per attribute) -> loss (sum of the attributes'
cross-entropies) -> evaluation (accuracy per attribute on the test split). It is the PPD job's
synthetic eye: users score what it reads in an image, and its penultimate features are what the
user encoder sees of a preference pair (`load_reader`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.builders.ppd_users import ATTRIBUTES
from scaleyard.data_loaders.decoders import Compose, ImageDecoder
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, first_samples, stack
from scaleyard.models.classifier import ClassifierConfig, ConvClassifier, classifier_flops_per_sample
from scaleyard.models.meta import shapes_only
from scaleyard.platform.config import ConfigError, DataConfig, TrainingConfig, batch_per_rank, bounded, stream_config
from scaleyard.platform.job import Context, EvalResult, Job, JobParts
from scaleyard.platform.planner import ModelShape

GROUPS = tuple((name, len(values)) for name, values in ATTRIBUTES.items())


@dataclass
class ModelConfig:
    width: int = bounded(16, 1)
    hidden: int = bounded(64, 1)
    dropout: float = bounded(0.0, 0.0, 0.9)


@dataclass
class EvalConfig:
    max_samples: int = bounded(2000, 0)  # 0 = skip evaluation
    batch_size: int = bounded(500, 1)


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/shapes/train", eval_path="data/shapes/test"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def labels_of(attributes: dict[str, Any]) -> list[int]:
    """Class index per attribute (position "none" for 2-3 shapes)."""
    values = {**attributes, "position": attributes.get("position") or "none"}
    return [ATTRIBUTES[name].index(values[name]) for name, _ in GROUPS]


@dataclass(frozen=True)
class AttributeDecoder:
    field: str = "json"

    def __call__(self, raw: dict[str, Any], position: int) -> dict[str, Any]:
        return {"labels": torch.tensor(labels_of(json.loads(raw[self.field])), dtype=torch.long)}


def split_logits(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(logits.split([n for _, n in GROUPS], dim=-1))


def model_config(cfg: DictConfig, channels: int = 3, image_size: int = 32) -> ClassifierConfig:
    return ClassifierConfig(in_channels=channels, image_size=image_size, num_classes=sum(n for _, n in GROUPS),
                            width=cfg.model.width, hidden=cfg.model.hidden, dropout=cfg.model.dropout)


class AttributeReader(nn.Module):
    """A trained reader: images [B, 3, H, W] in [0, 1] -> attribute probabilities, and frozen features."""

    def __init__(self, net: ConvClassifier):
        super().__init__()
        self.net = net

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class index per attribute [B, attributes]."""
        return torch.stack([g.argmax(-1) for g in split_logits(self.net(images))], dim=-1)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, list[float]]]:
        """Per image, each attribute's probabilities over its values (ATTRIBUTES order), rounded to
        4 decimals so that what is stored in shards and recomputed later compare equal."""
        groups = [g.float().softmax(-1) for g in split_logits(self.net(images))]
        return [{name: [round(float(p), 4) for p in g[i]] for (name, _), g in zip(GROUPS, groups)}
                for i in range(len(images))]


class Attributes(Job):
    name = "attributes"
    Config = Config

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a shapes split folder with index.json "
                              "(`scaleyard data build shapes --out data/shapes`)")

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        index = load_index(cfg.data.path)
        if "json" not in index.schema:
            raise ConfigError(f"config key 'data.path': {cfg.data.path} has no json attributes (build it with "
                              "`scaleyard data build shapes`)")
        shape = index.extra.get("image_shape", [3, 32, 32])
        decode = Compose((ImageDecoder(field="image.png"), AttributeDecoder()))
        stream = ShardStream(index, stream_config(cfg), decode=decode, collate=stack,
                             batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
                             rank=ctx.data_rank, world_size=ctx.data_world_size, required=("image.png", "json"))
        self.model_cfg = model_config(cfg, shape[0], shape[1])
        self.cfg, self.ctx = cfg, ctx
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = ConvClassifier(self.model_cfg)
        return JobParts(model=model, train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch["image"].to(self.ctx.device), batch["labels"].to(self.ctx.device)
        groups = split_logits(model(images))
        loss = sum(F.cross_entropy(g, labels[:, i]) for i, g in enumerate(groups))
        correct = torch.stack([(g.argmax(-1) == labels[:, i]).all() for i, g in enumerate(groups)])
        return loss, {"all_correct": correct.float().mean().detach()}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if not self.cfg.data.eval_path or self.cfg.eval.max_samples == 0:
            return EvalResult()
        correct = torch.zeros(len(GROUPS))
        total = 0
        decode = Compose((ImageDecoder(field="image.png"), AttributeDecoder()))
        for batch in first_samples(load_index(self.cfg.data.eval_path), decode, self.cfg.eval.max_samples,
                                   self.cfg.eval.batch_size):
            images, labels = batch["image"].to(self.ctx.device), batch["labels"].to(self.ctx.device)
            groups = split_logits(model(images).float())
            correct += torch.tensor([float((g.argmax(-1) == labels[:, i]).sum()) for i, g in enumerate(groups)])
            total += len(labels)
        metrics = {f"accuracy/{name}": float(c) / total for (name, _), c in zip(GROUPS, correct)}
        if self.ctx.is_main:
            (self.ctx.run_dir / "eval").mkdir(parents=True, exist_ok=True)
            (self.ctx.run_dir / "eval" / "accuracy.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        return EvalResult(metrics=metrics)

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        return classifier_flops_per_sample(model_config(cfg))

    @staticmethod
    def memory_shape(cfg: DictConfig) -> ModelShape:
        """For the planner and `scaleyard models`: parameters only (a small CNN on 3x32x32 shapes)."""
        with shapes_only():
            parameters = sum(p.numel() for p in ConvClassifier(model_config(cfg)).parameters())
        return ModelShape(parameters, parameters)

    def state_dict(self) -> dict:
        # the architecture travels with the weights, so the ppd job can rebuild the reader
        return {"model_config": dataclasses.asdict(self.model_cfg), "attributes": {k: list(v) for k, v in
                                                                                   ATTRIBUTES.items()}}


def load_reader(run_dir: str | Path, device: torch.device | str = "cpu") -> AttributeReader:
    """The trained reader of an attributes run (any engine's checkpoint), frozen, in eval mode."""
    from scaleyard.platform.weights import load_run_weights

    loaded = load_run_weights(run_dir, ema=False)
    if "attributes" not in loaded.job_state:
        raise ValueError(f"{run_dir} was not written by the attributes job (its checkpoint has no attribute list)")
    net = ConvClassifier(ClassifierConfig(**loaded.job_state["model_config"]))
    net.load_state_dict(loaded.weights)
    return AttributeReader(net).to(device).eval().requires_grad_(False)


JOB = Attributes
