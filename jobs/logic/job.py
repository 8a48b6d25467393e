"""logic: a convolutional differentiable logic-gate network on image shards (Fashion-MNIST), compiled to C.

Recipe: config -> data (shards, image + label decoders) -> model (LogicNet: thresholds, tree
convolutions with OR pooling, logic layers, GroupSum) -> loss (cross-entropy of the relaxed
network) -> evaluation (test accuracy of the relaxed network and of the discretised one, where
every gate is its argmax, side by side) -> `scaleyard export RUN --format c` (the discretised
network as C with bitwise operations, 64 images per machine word).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from scaleyard.data_loaders.decoders import Compose, ImageDecoder, LabelDecoder
from scaleyard.data_loaders.index import load_index
from scaleyard.data_loaders.pipeline import ShardStream, first_samples, stack
from scaleyard.models.logic.conv import TreeDepthError, check_tree_depth
from scaleyard.models.logic.network import LogicNet, LogicNetConfig, discretised, gate_count
from scaleyard.platform.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainingConfig,
    batch_per_rank,
    bounded,
    stream_config,
)
from scaleyard.platform.job import Context, EvalResult, Job, JobParts


@dataclass
class ModelConfig:
    thresholds: int = bounded(3, 1, 255)  # binary channels per image channel
    conv_channels: list[int] = field(default_factory=lambda: [8, 16])  # tree conv + OR pool each; [] = none
    tree_depth: int = bounded(3, 1)  # each conv kernel: a tree of 2^d - 1 gates over 2^d receptive-field cells
    fc: list[int] = field(default_factory=lambda: [8000, 8000])  # logic layers; the last splits into classes
    tau: float = bounded(10.0, 1e-6)  # GroupSum temperature
    residual_init: bool = True  # ~0.9 of each gate's initial mass on the pass-through gate
    # train the discretised network: argmax gates forward, the softmax mixture's gradient backward
    straight_through: bool = False
    connection_seed: int = 0  # the fixed random wiring


@dataclass
class EvalConfig:
    max_samples: int = bounded(10_000, 0)  # 0 = skip evaluation
    batch_size: int = bounded(500, 1)


@dataclass
class Config(TrainingConfig):
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/fashion_mnist/train",
                                                                 eval_path="data/fashion_mnist/test"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01))  # difflogic's Adam lr
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def model_config(cfg: DictConfig, in_channels: int = 1, image_size: int = 28, classes: int = 10) -> LogicNetConfig:
    m = cfg.model
    return LogicNetConfig(in_channels=in_channels, image_size=image_size, num_classes=classes,
                          thresholds=m.thresholds, conv_channels=tuple(m.conv_channels), tree_depth=m.tree_depth,
                          fc=tuple(m.fc), tau=m.tau, residual_init=m.residual_init,
                          connection_seed=m.connection_seed, straight_through=m.straight_through)


def check_model(cfg: DictConfig, in_channels: int = 1, image_size: int = 28, classes: int = 10) -> None:
    """The architecture's own constraints, each naming its key (before anything runs)."""
    m = cfg.model
    if not m.fc or any(width < 1 for width in m.fc):
        raise ConfigError(f"config key 'model.fc': {list(m.fc)} must list at least one logic layer width >= 1")
    if m.fc[-1] % classes:
        raise ConfigError(f"config key 'model.fc': the last layer's {m.fc[-1]} neurons must split into {classes} "
                          f"equal class groups (a multiple of {classes})")
    if any(width < 1 for width in m.conv_channels):
        raise ConfigError(f"config key 'model.conv_channels': {list(m.conv_channels)} must be >= 1 each")
    channels, side = in_channels * m.thresholds, image_size
    for layer, width in enumerate(m.conv_channels):
        if side < 2:
            raise ConfigError(f"config key 'model.conv_channels': {len(m.conv_channels)} conv + pool stages shrink "
                              f"{image_size}x{image_size} images below 1x1 at stage {layer}")
        try:
            check_tree_depth(m.tree_depth, channels, 3)
        except TreeDepthError as err:
            raise ConfigError(f"config key 'model.tree_depth': conv layer {layer}: {err}") from None
        channels, side = width, side // 2


class Logic(Job):
    name = "logic"
    Config = Config

    def check(self, cfg: DictConfig, world_size: int) -> None:
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': set it to a split folder with index.json "
                              "(build one with `scaleyard data build fashion_mnist --out data/fashion_mnist`)")
        check_model(cfg)  # Fashion-MNIST's shape; build() checks again against the shards' own

    def build(self, cfg: DictConfig, ctx: Context) -> JobParts:
        index = load_index(cfg.data.path)
        shape = index.extra.get("image_shape", [1, 28, 28])
        classes = len(index.extra.get("class_names", range(10)))
        check_model(cfg, shape[0], shape[1], classes)
        stream = ShardStream(
            index, stream_config(cfg), decode=Compose((ImageDecoder(), LabelDecoder())), collate=stack,
            batch_per_rank=batch_per_rank(cfg, ctx.data_world_size),
            rank=ctx.data_rank, world_size=ctx.data_world_size,
        )  # fmt: skip
        self.model_cfg = model_config(cfg, shape[0], shape[1], classes)
        self.cfg, self.ctx = cfg, ctx
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = LogicNet(self.model_cfg)
        return JobParts(model=model, train_data=stream)

    def train_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels = batch["image"].to(self.ctx.device), batch["label"].to(self.ctx.device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean().detach()}

    def evaluate(self, model: nn.Module, step: int) -> EvalResult:
        if not self.cfg.data.eval_path or self.cfg.eval.max_samples == 0:
            return EvalResult()
        relaxed = discrete = total = 0
        loss_sum = 0.0
        for batch in eval_batches(self.cfg, self.cfg.eval.batch_size):
            images, labels = batch["image"].to(self.ctx.device), batch["label"].to(self.ctx.device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            relaxed += int((logits.argmax(-1) == labels).sum())
            with discretised(model):
                discrete += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
        gates = model.gate_count() if isinstance(model, LogicNet) else {}
        return EvalResult(metrics={"accuracy_relaxed": relaxed / total, "accuracy_discrete": discrete / total,
                                   "loss": loss_sum / total, **{k: float(v) for k, v in gates.items()}})

    @staticmethod
    def flops_per_sample(cfg: DictConfig) -> float:
        """Gate evaluations are not FLOPs in the matmul sense; count ~10 elementwise operations per
        relaxed gate, forward + backward, so throughput figures stay comparable between runs."""
        return 10.0 * gate_count(model_config(cfg))["gates_per_image"]

    def state_dict(self) -> dict:
        # the architecture (and its wiring seed) travels with the weights for export and benchmarks
        return {"model_config": dataclasses.asdict(self.model_cfg)}

    @classmethod
    def export_formats(cls) -> dict[str, str]:
        return {"c": "the discretised network as C (bitwise, 64 images per word); also builds a .so beside it"}

    def export(self, fmt: str, cfg: DictConfig, weights: dict[str, torch.Tensor], job_state: dict[str, Any],
               out: Path) -> dict[str, Any]:
        from scaleyard.models.logic.compiled import compile_shared_library, write_c_source

        net = net_from_state(weights, job_state)
        source = write_c_source(net, out)
        library = compile_shared_library(source)
        return {"source": str(source), "library": str(library), **net.gate_count()}


def net_from_state(weights: dict[str, torch.Tensor], job_state: dict[str, Any]) -> LogicNet:
    if "model_config" not in job_state:
        raise ValueError("the checkpoint has no model_config: it was not written by the logic job")
    saved = dict(job_state["model_config"])
    saved["conv_channels"], saved["fc"] = tuple(saved["conv_channels"]), tuple(saved["fc"])
    net = LogicNet(LogicNetConfig(**saved))
    net.load_state_dict(weights)
    return net.eval()


def load_logic_net(run_dir: str | Path) -> LogicNet:
    """The trained network of a logic run (any engine's checkpoint; its EMA when it kept one)."""
    from scaleyard.platform.weights import load_run_weights

    loaded = load_run_weights(run_dir)
    return net_from_state(loaded.weights, loaded.job_state)


def eval_batches(cfg: DictConfig, batch_size: int):
    """The first `eval.max_samples` samples of the eval split in a fixed order, one pass."""
    decode = Compose((ImageDecoder(), LabelDecoder()))
    return first_samples(load_index(cfg.data.eval_path), decode, cfg.eval.max_samples, batch_size)


JOB = Logic
