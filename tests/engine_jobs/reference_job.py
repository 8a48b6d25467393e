"""A preference job with a frozen reference model (the shape of DPO), run by the real Trainer
under torchrun: `python -m torch.distributed.run --nproc_per_node 2 tests/engine_jobs/reference_job.py
RUN_DIR [overrides]`. Used by tests/test_engines_deepspeed.py to check that ZeRO-3 partitions the
frozen reference model like the trained one and that evaluation (collective under ZeRO-3) works;
registered through an entry point by tests/test_new_job_engines.py, which runs it through the CLI.

It declares its repeated blocks (`JobParts.blocks`: the scorer's hidden layers, which the
activation-checkpointing name rule would not find). `train/block_calls` (a metric for tests):
block forward calls made by the previous micro-batch's forward and backward, so twice the blocks
when activation checkpointing recomputes them in backward."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scaleyard.platform.checkpoint import weights_sha256
from scaleyard.platform.config import TrainingConfig, check_config, resolve
from scaleyard.platform.distributed import env_from_os
from scaleyard.platform.job import Context, EvalResult, Job, JobParts
from scaleyard.platform.launch import destroy_process_group
from scaleyard.platform.trainer import Trainer

FEATURES = 32


@dataclass
class Config(TrainingConfig):
    beta: float = 0.5
    hidden: int = 256


class Scorer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(FEATURES, hidden), nn.GELU()),
                                 nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()), nn.Linear(hidden, 1))

    def hidden_layers(self) -> list[nn.Module]:
        """The repeated blocks (what the job declares as JobParts.blocks)."""
        return list(self.net)[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Pairs:
    """Preference pairs (chosen, rejected): a hidden direction decides which is preferred. Batch i
    of data rank r is a pure function of (seed, i, r), so resuming at any position is exact."""

    def __init__(self, seed: int, batch: int, rank: int):
        self.seed, self.batch, self.rank, self.position = seed, batch, rank, 0
        self.direction = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position * 97 + self.rank)
            a, b = torch.randn(2, self.batch, FEATURES, generator=g)
            prefer_a = (a @ self.direction > b @ self.direction)[:, None]
            self.position += 1
            yield torch.where(prefer_a, a, b), torch.where(prefer_a, b, a)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the evaluated module really computes with (ZeRO-3: gathered, one at a time,
    unless the engine already gathered the whole model for evaluation: DeepSpeed refuses to
    gather a parameter twice)."""
    out = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") and param.ds_status.name != "AVAILABLE":
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters([param]):
                out[name] = param.detach().clone()
        else:
            out[name] = param.detach().clone()
    return out


class ReferenceJob(Job):
    name = "reference_probe"
    Config = Config

    def build(self, cfg, ctx: Context) -> JobParts:
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.run.seed)
        policy = Scorer(cfg.hidden)
        self.reference = copy.deepcopy(policy)
        self.policy_parameters = sum(p.numel() for p in policy.parameters())
        self.block_calls = 0
        # counted on entry (a pre-hook), after the copy (the reference's calls are not counted):
        # recomputation in backward stops once it has what backward needs, before forward hooks
        for block in policy.hidden_layers():
            block.register_forward_pre_hook(self._count_call)
        batch = cfg.train.batch_size // (ctx.data_world_size * cfg.train.grad_accum)
        return JobParts(model=policy, frozen={"reference": self.reference},
                        train_data=Pairs(cfg.run.seed, batch, ctx.data_rank), blocks=Scorer.hidden_layers)

    def _count_call(self, module: nn.Module, args: tuple) -> None:
        self.block_calls += 1

    def margins(self, model: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.reference(chosen) - self.reference(rejected)
        return self.cfg.beta * ((model(chosen) - model(rejected)) - ref)

    def train_step(self, model, batch):
        calls, self.block_calls = self.block_calls, 0
        chosen, rejected = (t.to(self.ctx.device) for t in batch)
        margins = self.margins(model, chosen, rejected)
        return -F.logsigmoid(margins).mean(), {"accuracy": (margins > 0).float().mean(), "block_calls": calls}

    def evaluate(self, model, step):
        g = torch.Generator().manual_seed(12345)
        direction = Pairs(self.cfg.run.seed, 1, 0).direction
        a, b = torch.randn(2, 512, FEATURES, generator=g)
        prefer_a = (a @ direction > b @ direction)[:, None]
        chosen, rejected = torch.where(prefer_a, a, b), torch.where(prefer_a, b, a)
        # read before the forward: under ZeRO-3 the forward releases the parameters the engine
        # gathered for evaluation (DeepSpeed's module hooks), and DeepSpeed refuses to gather again
        weights = weights_sha256(gathered(model))
        accuracy = float((self.margins(model, chosen, rejected) > 0).float().mean())
        readable = sum(p.numel() for p in model.parameters())  # what code after a forward can read

        def local(module: nn.Module) -> int:  # elements this rank holds (ZeRO-3: its partition)
            return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())

        probe = {"rank": self.ctx.rank, "accuracy": accuracy, "parameters": self.policy_parameters,
                 "local_policy": local(model), "local_reference": local(self.reference),
                 "eval_weights_sha256": weights, "readable_after_forward": readable}
        (self.ctx.run_dir / f"probe_rank{self.ctx.rank}.json").write_text(json.dumps(probe))
        return EvalResult(metrics={"accuracy": accuracy})


if __name__ == "__main__":
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = resolve(Config, [], [f"run.dir={run_dir}", *overrides])
    check_config(cfg, Config)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        Trainer(ReferenceJob(), cfg, env_from_os()).run()
    finally:
        destroy_process_group()
