"""What the Trainer asks of a job's parts, in-process with small jobs written here the way a
newcomer would write them: train_data checked before step 1, a plain map-style Dataset trained
with exact resume at any world size, and evaluation that never changes training."""

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from scaleyard.data_loaders.dataset_stream import DatasetStream
from scaleyard.platform.checkpoint import Checkpointer
from scaleyard.platform.config import TrainingConfig, check_config, resolve
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.job import EvalResult, Job, JobParts
from scaleyard.platform.trainer import BuildError, Trainer


class Points(Dataset):
    """Noisy linear targets: an ordinary map-style dataset, nothing scaleyard-specific."""

    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@dataclass
class Config(TrainingConfig):
    pass


class PointsJob(Job):
    """Dropout makes training draw from the global RNG, so anything that disturbs it shows."""

    name = "points"
    Config = Config

    def __init__(self, eval_draws: bool = False):
        self.eval_draws = eval_draws

    def build(self, cfg, ctx):
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, 1))
        return JobParts(model=model, train_data=Points())

    def train_step(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x).squeeze(-1), y), {}

    def evaluate(self, model, step):
        if self.eval_draws:  # an evaluation that samples, as generative jobs do
            torch.randn(100)
            np.random.rand(10)
            random.random()
        return EvalResult({"zero": 0.0})


class GeneratorJob(PointsJob):
    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)

        def batches():
            while True:
                yield Points().x[:8], Points().y[:8]

        parts.train_data = batches()
        return parts


def train(job, run_dir, *overrides):
    cfg = resolve(Config, [], [f"run.dir={run_dir}", "train.batch_size=8", "train.log_every=2",
                               "optim.schedule=constant", "train.ckpt_every=5", *overrides])
    check_config(cfg, Config)
    return Trainer(job, cfg, DistEnv(), handle_signals=False).run()


def test_unresumable_train_data_is_refused_before_step_one(tmp_path):
    with pytest.raises(BuildError, match="generator.*state_dict.*map-style"):
        train(GeneratorJob(), tmp_path, "train.steps=20", "train.ckpt_every=2")
    assert Checkpointer(tmp_path / "checkpoints", 1).all() == []
    assert not (tmp_path / "tb").exists()


def test_map_style_dataset_resumes_exactly(tmp_path):
    straight = train(PointsJob(), tmp_path / "straight", "train.steps=30")
    # the same run stopped at step 15 and started again from its checkpoint (data position,
    # RNG and optimizer restored; 30 steps of 8 samples cross the 96-sample epoch twice)
    train(PointsJob(), tmp_path / "split", "train.steps=15")
    resumed = train(PointsJob(), tmp_path / "split", "train.steps=30")
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert resumed["samples_seen"] == 240


def test_dataset_stream_order_does_not_depend_on_world_size():
    data = Points(20)
    single = DatasetStream(data, batch_per_rank=6, seed=3)
    pair = [DatasetStream(data, batch_per_rank=3, rank=r, world_size=2, seed=3) for r in range(2)]
    for step, (one, zero, first) in enumerate(zip(single.batch_indices(0), pair[0].batch_indices(0),
                                                  pair[1].batch_indices(0))):
        assert sorted(one) == sorted(zero + first)
        assert one[0::2] == zero and one[1::2] == first
        if step == 8:
            break
    # each epoch is a permutation: 20 samples, seen once per epoch
    flat = [i for _, batch in zip(range(10), single.batch_indices(0)) for i in batch]
    assert sorted(flat[:18]) != flat[:18] and len(set(flat[:20])) == 20
    # starting at a position gives the continuation of the same sequence
    later = next(DatasetStream(data, batch_per_rank=6, seed=3).batch_indices(12))
    assert later == flat[12:18]


def test_evaluation_does_not_change_training(tmp_path):
    quiet = train(PointsJob(eval_draws=True), tmp_path / "end_only", "train.steps=12")
    busy = train(PointsJob(eval_draws=True), tmp_path / "every_3", "train.steps=12", "train.eval_every=3")
    assert busy["weights_sha256"] == quiet["weights_sha256"]
