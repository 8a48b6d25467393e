"""classify: a Fashion-MNIST classifier trained from WebDataset shards.

Recipe: config -> data (shards, image + label decoders) -> model (ConvClassifier) -> loss
(cross-entropy) -> evaluation (test accuracy). Its checkpoint is the feature network for the
image-generation metrics of other jobs (`load_classifier`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, LabelDecoder
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, first_samples, stack
from scaleyard.models.classifier import ClassifierConfig, ConvClassifier, classifier_flops_per_sample
from scaleyard.models.meta import shapes_only
from scaleyard.platform.config import ConfigError, DataConfig, TrainingConfig, batch_per_rank, bounded, stream_config
from scaleyard.platform.job import Context, EvalResult, Job, JobParts
from scaleyard.platform.planner import ModelShape


@dataclass
class ModelConfig:
    width: int = bounded(32, 1)
    hidden: int = bounded(128, 1)
    dropout: float = bounded(0.1, 0.0, 0.9)


@dataclass
class EvalConfig:
    max_samples: int = bounded(10_000, 0)  # 0 = skip evaluation
    batch_size: int = bounded(500, 1)


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/fashion_mnist/train",
                                                                 eval_path="data/fashion_mnist/test"))
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    flip: bool = False


def model_config(cfg: DictConfig, in_channels: int = 1, image_size: int = 28, classes: int = 10) -> ClassifierConfig:
    return ClassifierConfig(in_channels=in_channels, image_size=image_size, num_classes=classes,
                            width=cfg.model.width, hidden=cfg.model.hidden, dropout=cfg.model.dropout)


class Classify(Job):
    name = "classify"
    Config = Config

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a split folder with index.json "
                              "(build one with `scaleyard data build fashion_mnist --out data/fashion_mnist`)")

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        index = load_index(cfg.data.path)
        shape = index.extra.get("image_shape", [1, 28, 28])
        classes = len(index.extra.get("class_names", range(10)))
        decode = Compose((ImageDecoder(flip=cfg.flip, seed=cfg.run.seed), LabelDecoder()))
        stream = ShardStream(
            index, stream_config(cfg), decode=decode, collate=stack,
            batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
            rank=ctx.data_rank, world_size=ctx.data_world_size,
        )  # fmt: skip
        self.model_cfg = model_config(cfg, shape[0], shape[1], classes)
        self.cfg, self.ctx = cfg, ctx
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = ConvClassifier(self.model_cfg)
        return JobParts(model=model, train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch["image"].to(self.ctx.device), batch["label"].to(self.ctx.device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, {"accuracy": accuracy.detach()}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if not self.cfg.data.eval_path or self.cfg.eval.max_samples == 0:
            return EvalResult()
        correct = total = 0
        loss_sum = 0.0
        for batch in eval_batches(self.cfg, self.cfg.eval.batch_size):
            images, labels = batch["image"].to(self.ctx.device), batch["label"].to(self.ctx.device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        return EvalResult(metrics={"accuracy": correct / total, "loss": loss_sum / total})

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        return classifier_flops_per_sample(model_config(cfg))

    @staticmethod
    def first_layer(cfg: DictConfig) -> str:
        """The first convolution, which reads the pixels: where optim.tract=true applies TrAct."""
        return "stages.0"

    @staticmethod
    def memory_shape(cfg: DictConfig) -> ModelShape:
        """For the planner: parameters only (a small CNN; its activations are not modelled)."""
        with shapes_only():
            parameters = sum(p.numel() for p in ConvClassifier(model_config(cfg)).parameters())
        return ModelShape(parameters, parameters)

    @classmethod
    def model_presets(cls) -> list[dict]:
        """`scaleyard models`: the network of each YAML preset (Fashion-MNIST's 1x28x28 images,
        10 classes), with its exact parameters and training FLOPs per sample."""
        from scaleyard.platform.config import resolve

        rows = []
        for name in cls.presets():
            cfg = resolve(cls.Config, [cls.presets_dir() / f"{name}.yaml"], [])
            rows.append({"name": name, "use": f"--preset {name}", "params": cls.memory_shape(cfg).trainable,
                         "flops_per_sample": cls.flops_per_sample(cfg), "width": cfg.model.width,
                         "hidden": cfg.model.hidden})
        return rows

    def state_dict(self) -> dict:
        # The architecture travels with the weights, so other jobs can rebuild the network.
        return {"model_config": dataclasses.asdict(self.model_cfg)}


def eval_batches(cfg: DictConfig, batch_size: int):
    """The first `eval.max_samples` samples of the eval split in a fixed order, one pass."""
    decode = Compose((ImageDecoder(), LabelDecoder()))
    return first_samples(load_index(cfg.data.eval_path), decode, cfg.eval.max_samples, batch_size)


def load_classifier(run_dir: str | Path, device: torch.device | str = "cpu") -> ConvClassifier:
    """The trained classifier of a finished (or checkpointed) classify run, in eval mode, from
    any engine's checkpoint (its trained weights, not an EMA)."""
    from scaleyard.platform.weights import load_run_weights

    loaded = load_run_weights(run_dir, ema=False)
    if "model_config" not in loaded.job_state:
        raise ValueError(f"{run_dir} was not written by the classify job (its checkpoint has no model_config)")
    model = ConvClassifier(ClassifierConfig(**loaded.job_state["model_config"]))
    model.load_state_dict(loaded.weights)
    return model.to(device).eval()


JOB = Classify
