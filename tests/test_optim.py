"""The optimizer's promises (platform/optim.py): warmup + cosine / linear / constant decay to
min_lr_ratio, the EMA's warm-up, weight decay on matrices only, and a job's parameter groups;
by hand-computed numbers, then through a real classify run (TensorBoard file and checkpoint read back)."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from scaleyard.jobs.classify.job import Classify
from scaleyard.platform.checkpoint import Checkpointer
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.launch import prepare, write_config
from scaleyard.platform.optim import EMA, default_param_groups, make_scheduler
from scaleyard.platform.trainer import Trainer


def applied_lrs(steps: int, **optim) -> list[float]:
    """The learning rate of each of `steps` optimizer steps (a real AdamW + the scheduler)."""
    cfg = OmegaConf.create({"warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1, **optim})
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, steps, cfg)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_linear_or_constant_to_min_lr_ratio():
    # 4 warmup steps, then 8 decay steps from the base lr 2.0 towards 2.0 * 0.25 = 0.5
    warmup = [0.5, 1.0, 1.5, 2.0]  # (k + 1) / 4 of the base lr: never 0, the base lr at the last one
    cosine = applied_lrs(12, warmup_steps=4, schedule="cosine", min_lr_ratio=0.25)
    assert cosine[:4] == pytest.approx(warmup)
    # progress p = (k - 4) / 8; lr = 0.5 + 1.5 * (1 + cos(pi p)) / 2
    assert cosine[4:] == pytest.approx([0.5 + 0.75 * (1 + math.cos(math.pi * p / 8)) for p in range(8)])
    assert cosine[8] == pytest.approx(1.25)  # half-way: half-way between base and minimum
    linear = applied_lrs(12, warmup_steps=4, schedule="linear", min_lr_ratio=0.25)
    assert linear == pytest.approx(warmup + [2.0, 1.8125, 1.625, 1.4375, 1.25, 1.0625, 0.875, 0.6875])
    constant = applied_lrs(12, warmup_steps=4, schedule="constant", min_lr_ratio=0.25)
    assert constant == pytest.approx(warmup + [2.0] * 8)
    # the minimum is reached at the end of the decay and held (a run extended past train.steps)
    assert applied_lrs(30, schedule="linear", min_lr_ratio=0.25)[-1] == pytest.approx(2.0 * (0.25 + 0.75 / 30))
    cfg = OmegaConf.create({"warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.25})
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, 10, cfg)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    # no warmup, no decay: min_lr_ratio=1 keeps the base lr throughout
    assert applied_lrs(6, min_lr_ratio=1.0) == pytest.approx([2.0] * 6)


def test_ema_warm_up_by_hand():
    """decay_k = min(decay, (1 + k) / (10 + k)) at update k (0-based): the first average is
    mostly the trained weights, not the random initialisation."""
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.3)
    expected = 0.0
    decays = [1 / 10, 2 / 11, 3 / 12, 0.3, 0.3, 0.3]  # 4 / 13 = 0.308 is capped at 0.3
    for k, decay in enumerate(decays):
        weight = float(k + 1)  # the trained weight after step k + 1
        with torch.no_grad():
            module.weight.fill_(weight)
        ema.update(module, k)
        expected = decay * expected + (1 - decay) * weight
        assert ema.shadow.weight.item() == pytest.approx(expected, abs=1e-6), k
    assert expected == pytest.approx(5.5749, abs=1e-4)  # the hand computation itself, written out
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.3


def test_default_groups_decay_matrices_only():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "conv": nn.Conv2d(1, 4, 3), "norm": nn.LayerNorm(4),
                           "linear": nn.Linear(4, 4), "frozen": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    groups = default_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_decay == {0.05: ["conv.weight", "embed.weight", "linear.weight"],
                        0.0: ["conv.bias", "linear.bias", "norm.bias", "norm.weight"]}


def train(job, classify_args, run_dir, *overrides):
    prepared = prepare("classify", [*classify_args, f"run.dir={run_dir}", *overrides], preset="tiny")
    write_config(prepared)
    return Trainer(job, prepared.cfg, DistEnv(), handle_signals=False).run()


def final_state(run_dir):
    return Checkpointer(run_dir / "checkpoints", 1).load(Checkpointer(run_dir / "checkpoints", 1).latest())[0]


def test_real_run_logs_the_schedule_and_decays_matrices_only(tmp_path, classify_args):
    train(Classify(), classify_args, tmp_path, "optim.lr=0.01", "optim.warmup_steps=3", "optim.schedule=cosine",
          "optim.min_lr_ratio=0.2", "optim.weight_decay=0.05", "train.log_every=1", "train.eval_every=0")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(logged) == list(range(1, 13))
    # step s is logged with the lr its update used (the schedule's value k = s - 1): warmup 1/3, 2/3,
    # then 10 cosine steps from the peak
    factor = [(k + 1) / 3 if k < 3 else 0.2 + 0.8 * (1 + math.cos(math.pi * (k - 3) / 9)) / 2 for k in range(13)]
    assert [logged[s] for s in range(1, 13)] == pytest.approx([0.01 * f for f in factor[:12]], rel=1e-6)

    optimizer = final_state(tmp_path)["optimizer"]
    decays = [g["weight_decay"] for g in optimizer["param_groups"]]
    assert decays == [0.05, 0.0]
    ndim = {index: state["exp_avg"].dim() for index, state in optimizer["state"].items()}
    matrices, vectors = (optimizer["param_groups"][i]["params"] for i in range(2))
    assert matrices and all(ndim[i] >= 2 for i in matrices)  # conv kernels and linear weights
    assert vectors and all(ndim[i] == 1 for i in vectors)  # biases
    assert len(matrices) + len(vectors) == len(ndim) == 12  # every parameter of the classifier, once


class GroupedClassify(Classify):
    """classify with its own parameter groups: linear layers at 1/4 of the lr and weight decay 0.3,
    everything else at the base lr without decay. Records, at every micro-batch, the lr each group
    is about to use and the weights the step starts from."""

    def __init__(self):
        super().__init__()
        self.lrs, self.weights = [], []

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        parts.param_groups = self.groups
        return parts

    def groups(self, model):
        linear = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
        rest = [p for p in model.parameters() if all(p is not q for q in linear)]
        # torch keeps these dicts as the optimizer's param_groups: what the scheduler writes is seen here
        self.dicts = [{"params": rest, "weight_decay": 0.0},
                      {"params": linear, "weight_decay": 0.3, "lr": self.cfg.optim.lr / 4}]
        return self.dicts

    def train_step(self, model, batch):
        self.lrs.append([g["lr"] for g in self.dicts])
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return super().train_step(model, batch)


def test_job_param_groups_are_honoured_and_ema_follows_its_warm_up(tmp_path, classify_args):
    job = GroupedClassify()
    train(job, classify_args, tmp_path, "optim.lr=0.01", "optim.warmup_steps=2", "optim.schedule=linear",
          "optim.min_lr_ratio=0.5", "optim.weight_decay=0.05", "train.ema_decay=0.5", "train.eval_every=0")
    factor = [(k + 1) / 2 if k < 2 else 0.5 + 0.5 * (1 - (k - 2) / 10) for k in range(12)]
    assert [lr for lrs in job.lrs for lr in lrs] == pytest.approx([lr for f in factor for lr in (0.01 * f, 0.0025 * f)],
                                                                  rel=1e-6)
    state = final_state(tmp_path)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.3]  # not the default split, nor optim.weight_decay
    assert [len(g["params"]) for g in groups] == [8, 4]  # conv weights + biases; 2 linear weights + biases

    # EMA: starts at the initial weights; update k (after step k + 1) uses min(0.5, (1 + k) / (10 + k))
    trajectory = [*job.weights, {n: v for n, v in state["model"].items()}]
    expected = {n: v.clone() for n, v in trajectory[0].items()}
    for k in range(12):
        decay = min(0.5, (1 + k) / (10 + k))
        expected = {n: decay * expected[n] + (1 - decay) * trajectory[k + 1][n] for n in expected}
    for name, value in expected.items():
        assert torch.allclose(state["ema"][name], value, atol=1e-7, rtol=0), name
    assert any(not torch.allclose(state["ema"][n], state["model"][n], atol=1e-4) for n in expected)
