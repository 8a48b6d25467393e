"""Trainer overhead: steps/s of the full Trainer against a hand-written PyTorch loop on the same
model, batch and in-memory data, alternating in one process so machine noise hits both.

    python benchmarks/step_overhead.py [--steps 300] [--rounds 3] [--width 16]

Prints JSON with both rates and their ratio (goal >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from scaleyard.jobs.classify.job import Classify, Config
from scaleyard.models.classifier import ClassifierConfig, ConvClassifier
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.job import JobParts
from scaleyard.platform.optim import default_param_groups, make_optimizer
from scaleyard.platform.trainer import Trainer


class InMemory:
    """The same batch forever, with the state interface the Trainer saves."""

    def __init__(self, batch):
        self.batch, self.position = batch, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch

    def state_dict(self):
        return {"global_index": self.position}

    def load_state_dict(self, state):
        self.position = state["global_index"]


class InMemoryClassify(Classify):
    def __init__(self, model_cfg, batch):
        super().__init__()
        self.model_cfg_fixed, self.batch = model_cfg, batch

    def build(self, cfg, ctx):
        self.cfg, self.ctx, self.model_cfg = cfg, ctx, self.model_cfg_fixed
        torch.manual_seed(0)
        return JobParts(model=ConvClassifier(self.model_cfg), train_data=InMemory(self.batch))


def bare_loop(model_cfg, batch, steps, cfg) -> float:
    torch.manual_seed(0)
    model = ConvClassifier(model_cfg)
    optimizer = make_optimizer(default_param_groups(model, cfg.optim.weight_decay), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    images, labels = batch["image"], batch["label"]
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()
    return steps / (time.perf_counter() - start)


def trainer_loop(model_cfg, batch, steps, cfg) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = cfg.copy()
        cfg.run.dir = run_dir
        job = InMemoryClassify(model_cfg, batch)
        start = time.perf_counter()
        Trainer(job, cfg, DistEnv(), handle_signals=False).run()
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model_cfg = ClassifierConfig(width=args.width, hidden=64, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(args.batch, 1, 28, 28, generator=generator),
             "label": torch.randint(0, 10, (args.batch,), generator=generator)}
    cfg = OmegaConf.structured(Config)
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = args.steps, args.batch, 50
    cfg.train.ckpt_every, cfg.eval.max_samples, cfg.optim.schedule = 0, 0, "constant"
    cfg.data.eval_path = ""
    bare, trainer = [], []
    bare_loop(model_cfg, batch, 20, cfg)  # warm-up
    for _ in range(args.rounds):
        bare.append(bare_loop(model_cfg, batch, args.steps, cfg))
        trainer.append(trainer_loop(model_cfg, batch, args.steps, cfg))
    best_bare, best_trainer = max(bare), max(trainer)
    print(json.dumps({
        "benchmark": "step_overhead", "steps": args.steps, "rounds": args.rounds, "batch": args.batch,
        "bare_steps_per_s": round(best_bare, 2), "trainer_steps_per_s": round(best_trainer, 2),
        "ratio": round(best_trainer / best_bare, 4),
        "note": "trainer time includes set-up and one final checkpoint; best of rounds",
    }, indent=1))


if __name__ == "__main__":
    main()
