"""DeepSpeed ZeRO 1-3 on 2 gloo ranks through the real CLI and real DeepSpeed: loss curves match
DDP's, SIGKILL + resume ends with the uninterrupted run's weights, export consolidates them,
ZeRO-3 partitions the trained and a frozen reference model, and impossible settings are refused
before anything runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import kill_while_writing

from scaleyard.platform.checkpoint import weights_sha256

from conftest import REPO, assert_sampling_uses, scaleyard, scaleyard_in_process

pytest.importorskip("deepspeed")
LOSS_TOLERANCE = 1e-4  # fp32 on CPU: only the order of floating-point reductions differs


def t2i_args(fmnist, run_dir, *extra):
    return ["run", "t2i", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            "train.steps=12", "train.ckpt_every=4", "train.log_every=1", "eval.samples=0", "eval.val_samples=32",
            "train.ema_decay=0.9", f"run.dir={run_dir}", "--nproc", "2", *extra]


def losses(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_reference(fmnist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    done = scaleyard(*t2i_args(fmnist, run_dir, "engine.name=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


# ZeRO-3 (the stage that partitions everything) in the default tier; 1 and 2 in the slow tier
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_stage_matches_ddp_resumes_exactly_and_exports(fmnist, tmp_path, ddp_reference, stage):
    engine = ["engine.name=deepspeed", f"engine.zero_stage={stage}"]
    reference = tmp_path / "reference"
    done = scaleyard(*t2i_args(fmnist, reference, *engine))
    assert done.returncode == 0, done.stderr[-3000:]
    expected = losses(ddp_reference)
    got = losses(reference)
    assert len(got) == len(expected) == 12
    assert max(abs(a - b) for a, b in zip(got, expected)) < LOSS_TOLERANCE, (got, expected)
    assert (reference / "checkpoints" / "step_00000012" / "deepspeed").is_dir()

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *t2i_args(fmnist, interrupted, *engine)]
    kill_while_writing(command, interrupted / "checkpoints", 8)
    assert sorted(p.name for p in (interrupted / "checkpoints").glob("step_*")) == ["step_00000004"]
    resumed = scaleyard(*t2i_args(fmnist, interrupted, *engine))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert summary(interrupted)["weights_sha256"] == summary(reference)["weights_sha256"]
    assert summary(interrupted)["final_loss"] == summary(reference)["final_loss"]

    exported = scaleyard("export", str(reference), "--format", "safetensors")
    assert exported.returncode == 0, exported.stderr[-2000:]
    weights = load_file(reference / "export" / "step_00000012.safetensors")
    assert weights_sha256(weights) == summary(reference)["weights_sha256"]
    ema = scaleyard("export", str(reference), "--ema")
    assert ema.returncode == 0, ema.stderr[-2000:]
    ema_weights = load_file(reference / "export" / "step_00000012_ema.safetensors")
    assert ema_weights.keys() == weights.keys()
    assert any(not (ema_weights[k] == weights[k]).all() for k in weights)
    assert_sampling_uses(reference, ema_weights, tmp_path / "samples")  # sampling reads the EMA partitions
    again = scaleyard("export", str(reference))
    assert again.returncode == 2 and "never overwrite" in again.stderr


@pytest.mark.slow
def test_zero3_offload_and_bf16_train(fmnist, tmp_path, ddp_reference):
    offload = tmp_path / "offload"
    done = scaleyard(*t2i_args(fmnist, offload, "engine.name=deepspeed", "engine.zero_stage=3",
                               "engine.offload_optimizer=true", "engine.offload_params=true"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(offload), losses(ddp_reference))) < LOSS_TOLERANCE

    bf16 = tmp_path / "bf16"
    done = scaleyard(*t2i_args(fmnist, bf16, "engine.name=deepspeed", "engine.zero_stage=2",
                               "train.precision=bf16"))
    assert done.returncode == 0, done.stderr[-3000:]
    # bf16 weights and activations: same trajectory to about bf16's 3 significant digits, and not
    # fp32's (an ignored train.precision would match DDP to LOSS_TOLERANCE)
    bf16_diffs = [abs(a - b) for a, b in zip(losses(bf16), losses(ddp_reference))]
    assert len(bf16_diffs) == 12 and LOSS_TOLERANCE * 10 < max(bf16_diffs) < 0.05, bf16_diffs
    # summary and export both hold the fp32 master weights, not the bf16 working copy
    exported = scaleyard("export", str(bf16))
    assert exported.returncode == 0, exported.stderr[-2000:]
    weights = load_file(bf16 / "export" / "step_00000012.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert weights_sha256(weights) == summary(bf16)["weights_sha256"]


# CI budget: the frozen reference's ZeRO-3 partitions are also checked, by default, through the CLI in
# test_new_job_engines.py (reference_probe); the EMA-export check here runs in the slow tier
@pytest.mark.slow
def test_zero3_partitions_trained_and_frozen_reference_models(tmp_path):
    run_dir = tmp_path / "dpo"
    overrides = ["engine.name=deepspeed", "engine.zero_stage=3", "train.steps=40", "train.batch_size=64",
                 "optim.lr=3e-3", "train.log_every=10", "train.ckpt_every=0", "train.ema_decay=0.9",
                 "train.eval_every=20",
                 # DeepSpeed keeps parameters under 1e5 elements whole by default; partition all of them
                 "engine.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "engine_jobs" / "reference_job.py"), str(run_dir), *overrides],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    probes = [json.loads((run_dir / f"probe_rank{r}.json").read_text()) for r in range(2)]
    total = probes[0]["parameters"]
    for probe in probes:
        # each rank holds about half of every parameter (partitions are padded to equal size)
        assert 0.5 * total <= probe["local_policy"] <= 0.5 * total + 8, probe
        assert 0.5 * total <= probe["local_reference"] <= 0.5 * total + 8, probe
        assert probe["accuracy"] > 0.8, probe  # the policy learned the preference against the reference
    assert probes[0]["accuracy"] == probes[1]["accuracy"]
    # evaluation ran on the EMA; what it computed with is what its partitions export to (a
    # parameter DeepSpeed kept gathered between uses would have gone stale)
    exported = scaleyard("export", str(run_dir), "--ema")
    assert exported.returncode == 0, exported.stderr[-2000:]
    ema = load_file(run_dir / "export" / "step_00000040_ema.safetensors")
    assert weights_sha256(ema) == probes[0]["eval_weights_sha256"] == probes[1]["eval_weights_sha256"]


@pytest.mark.parametrize("override,message", [
    (["engine.zero_stage=5"], "'engine.zero_stage': 5 is above the maximum 3"),
    (["engine.zero_stage=2", "engine.offload_params=true"], "parameter offload needs engine.zero_stage=3"),
    (["engine.zero_stage=0", "engine.offload_optimizer=true"], "optimizer offload needs engine.zero_stage >= 1"),
    (["engine.deepspeed.optimizer.type=Adam"], "'engine.deepspeed.optimizer': scaleyard builds the optimizer"),
    (["engine.deepspeed.zero_optimization.offload_param.device=nvme", "engine.zero_stage=3"],
     "AsyncIOBuilder op cannot be built here"),
    (["train.precision=fp16"], "fp16 with DeepSpeed needs a GPU"),
])
def test_impossible_deepspeed_settings_refused_before_running(fmnist, tmp_path, override, message):
    run_dir = tmp_path / "never"
    args = t2i_args(fmnist, run_dir, "engine.name=deepspeed", *override)
    if "zero_stage=5" in override[0]:  # one case through a real process; the others in this one
        done = scaleyard(*args)
        code, stderr = done.returncode, done.stderr
    else:
        code, stderr = scaleyard_in_process(*args)
    assert code == 2, stderr[-2000:]
    assert message in stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_gradient_accumulation_matches_ddp(fmnist, tmp_path):
    """train.grad_accum=2 reaches DeepSpeed as gradient_accumulation_steps (the Trainer's loss
    division is not repeated): the same curve as DDP accumulating the same micro-batches."""
    curves = []
    for engine in (["engine.name=ddp"], ["engine.name=deepspeed", "engine.zero_stage=2"]):
        run_dir = tmp_path / engine[-1].replace("=", "_")
        done = scaleyard(*t2i_args(fmnist, run_dir, *engine, "train.grad_accum=2", "train.steps=6",
                                   "train.ckpt_every=0"))
        assert done.returncode == 0, done.stderr[-3000:]
        curves.append(losses(run_dir))
    assert len(curves[0]) == 6
    assert max(abs(a - b) for a, b in zip(*curves)) < LOSS_TOLERANCE, curves
