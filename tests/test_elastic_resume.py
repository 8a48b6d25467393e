"""Elastic resume: a sharded run (DeepSpeed ZeRO, megatron tensor parallelism) and a DDP run resume
at another world size through the real CLI, keeping optimizer state, EMA, LR schedule and data
position.

Each test runs 12 steps uninterrupted at one world size (checkpoints at 4, 8, 12), then makes its
folder look like a run stopped after step 8 (the step-12 checkpoint moved aside, summary.json
removed) and resumes it at another world size, checkpointing every step. The continuation is
compared with the uninterrupted run's last 4 steps. It cannot be bitwise equal: the t2i job draws
its noise from each rank's RNG (a rank that did not exist gets a fresh one) and sums are reduced in
another order; the LR schedule and the data position are exact.

Moved state is checked tensor by tensor, consolidated over shards (DeepSpeed's universal
conversion, megatron's saved layout): between the step-8 checkpoint (old world) and the step-9
one (new world), AdamW's moments must follow its update exactly, m9 = b1*m8 + (1-b1)*g and
v9 = b2*v8 + (1-b2)*g^2 with the g that m implies, and the EMA must be d*ema8 + (1-d)*w9. A
dropped or reset state breaks these equations by far more than rounding.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_engines_deepspeed import losses, summary
from test_engines_deepspeed import t2i_args as ds_args
from test_engines_megatron import t2i_args as tp_args

from scaleyard.platform.checkpoint import CheckpointRef
from scaleyard.platform.checkpoint_integrity import safe_load
from scaleyard.platform.export import full_weights

from conftest import scaleyard

STEP12 = "step_00000012"
# per-step training loss of the continuation vs the uninterrupted run, another data-parallel world
# size: the noise of the samples a vanished (or new) rank draws differs (measured over 4 steps:
# 0.036 for 2 -> 1 ranks, DDP and ZeRO alike; 0.091 for 1 -> 2, where rank 1 starts a fresh RNG)
LOSS_TOLERANCE = 0.15
# TP=2 -> TP=1 keeps the data-parallel world (1) and so every random draw; only sums are reduced in
# another order (measured: 2.4e-7)
TP_LOSS_TOLERANCE = 1e-5
# final evaluation loss (fixed evaluation noise): the weights' continuation (measured: <= 0.003)
EVAL_TOLERANCE = 0.01
# weights at step 12 vs the uninterrupted run, relative (measured: <= 0.03)
WEIGHT_TOLERANCE = 0.1
# AdamW's update equation across the move, relative (fp32 rounding; measured: <= 1e-7, a dropped state: >= 0.5)
UPDATE_TOLERANCE = 1e-3
RESUME = ["train.ckpt_every=1", "train.keep_checkpoints=10"]  # the first step after the move is kept


def stop_after_step_8(run_dir: Path, keep: Path) -> dict:
    """The uninterrupted run's results, then its folder as a run stopped after step 8 would leave
    it; the step-12 checkpoint is moved to `keep` for comparison."""
    reference = {"losses": losses(run_dir), "lr": scalars(run_dir, "train/lr"), "summary": summary(run_dir),
                 "data": safe_load(run_dir / "checkpoints" / STEP12 / "train_state.pt")["data"]}
    shutil.move(run_dir / "checkpoints" / STEP12, keep)
    (run_dir / "summary.json").unlink()
    return reference


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def check_continuation(run_dir: Path, reference: dict, resumed_output: str, world: int,
                       loss_tolerance: float = LOSS_TOLERANCE) -> None:
    assert "resumed from" in resumed_output and "step_00000008" in resumed_output, resumed_output[-2000:]
    got = losses(run_dir)
    assert len(got) == 12 and got[:8] == reference["losses"][:8]
    diffs = [abs(a - b) for a, b in zip(got[8:], reference["losses"][8:])]
    assert max(diffs) < loss_tolerance, (got, reference["losses"])
    assert scalars(run_dir, "train/lr") == reference["lr"]  # the schedule continued exactly
    state = safe_load(run_dir / "checkpoints" / STEP12 / "train_state.pt")
    assert state["data"] == reference["data"]  # the same global data position
    done = summary(run_dir)
    assert done["world_size"] == world and done["step"] == 12
    assert abs(done["eval"]["loss"] - reference["summary"]["eval"]["loss"]) < EVAL_TOLERANCE, (done, reference)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the resharded copy is gone


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-12))


def check_adam_continued(run_dir: Path, before: dict, after: dict) -> None:
    """`before`/`after`: per parameter, its consolidated AdamW state at steps 8 and 9."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    b1, b2 = cfg.optim.beta1, cfg.optim.beta2
    assert before.keys() == after.keys() and len(before) > 10
    for name, old in before.items():
        new = after[name]
        assert float(old["step"]) == 8 and float(new["step"]) == 9, name
        grad = (new["exp_avg"] - b1 * old["exp_avg"]) / (1 - b1)
        assert relative(b2 * old["exp_avg_sq"] + (1 - b2) * grad**2, new["exp_avg_sq"]) < UPDATE_TOLERANCE, name
        # the state is not trivially equal across one step (else the equation would prove nothing)
        assert relative(b2 * old["exp_avg_sq"], new["exp_avg_sq"]) > 10 * UPDATE_TOLERANCE or \
            relative(old["exp_avg"], new["exp_avg"]) > 10 * UPDATE_TOLERANCE, name


def check_adamw_step(run_dir: Path, weights8: dict, weights9: dict, after: dict, shapes: dict | None = None) -> None:
    """The first update after the move is AdamW's with the moved moments, step count (bias
    correction), learning rate and weight decay of each parameter's group. `shapes`: the
    parameters' shapes where the tensors given are flattened (ZeRO-3's universal files)."""
    cfg = OmegaConf.load(run_dir / "config.yaml").optim
    lr = scalars(run_dir, "train/lr")[8]  # logged at step 9: the lr step 9 used
    for name, state in after.items():
        ndim = len(shapes[name]) if shapes else weights8[name].ndim
        decay = cfg.weight_decay if ndim >= 2 else 0.0  # optim.default_param_groups
        denom = state["exp_avg_sq"].sqrt() / (1 - cfg.beta2**9) ** 0.5 + cfg.eps
        expected = weights8[name] * (1 - lr * decay) - lr / (1 - cfg.beta1**9) * state["exp_avg"] / denom
        assert relative(weights9[name] - weights8[name], expected - weights8[name]) < UPDATE_TOLERANCE, name


def check_ema_continued(checkpoints: Path, names) -> None:
    """EMA at step 9 = d*EMA at step 8 (old world) + (1-d)*weights at step 9 (new world)."""
    decay = min(0.9, (1 + 8) / (10 + 8))  # EMA.decay_at(8) with train.ema_decay=0.9
    ema8 = full_weights(CheckpointRef(8, checkpoints / "step_00000008"), ema=True)
    ema9 = full_weights(CheckpointRef(9, checkpoints / "step_00000009"), ema=True)
    weights9 = full_weights(CheckpointRef(9, checkpoints / "step_00000009"))
    names = list(names)
    got = torch.cat([ema9[name].flatten() for name in names])
    expected = torch.cat([(decay * ema8[name] + (1 - decay) * weights9[name]).flatten() for name in names])
    # measured: <= 1e-9 (an EMA reset to the step-8 weights on load gives ~7e-5)
    assert relative(got, expected) < 1e-6


def check_weights_close(got: dict, want: dict) -> None:
    for name in want:
        assert relative(got[name], want[name]) < WEIGHT_TOLERANCE, name


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------------
def zero_moments(checkpoint: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's consolidated fp32 weight, Adam moments and step, through DeepSpeed's own
    universal-checkpoint conversion (independent of the shard layout)."""
    from scaleyard.platform.engines.deepspeed_engine import to_universal

    to_universal(checkpoint / "deepspeed", out)
    # ZeRO-3's conversion keeps one step for all parameters in its global optimizer state (DeepSpeed
    # objects inside: weights_only=False on a file this test's own conversion just wrote)
    common = torch.load(out / "zero" / "optimizer_state.pt", weights_only=False)
    step = common.get("optimizer_state_dict", {}).get("state", {0: {"step": None}})[0]["step"]
    moments = {}
    for folder in (out / "zero").iterdir():
        if folder.is_dir():
            saved = {key: torch.load(folder / f"{key}.pt", weights_only=True)
                     for key in ("fp32", "exp_avg", "exp_avg_sq", "step") if (folder / f"{key}.pt").exists()}
            moments[folder.name] = {"step": step, **{key: value["param"] if isinstance(value, dict) else value
                                                     for key, value in saved.items()}}
    return moments


@pytest.mark.slow  # CI budget: every elastic resume (about 40 s each on 2 cores) is in the slow tier
@pytest.mark.parametrize("stage,before,after", [pytest.param(2, 2, 1, marks=pytest.mark.slow), (3, 2, 1),
                                                pytest.param(2, 1, 2, marks=pytest.mark.slow),
                                                pytest.param(1, 2, 1, marks=pytest.mark.slow)])
def test_zero_run_resumes_at_another_world_size(fmnist, tmp_path, stage, before, after):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    engine = ["engine.name=deepspeed", f"engine.zero_stage={stage}", "train.keep_checkpoints=3",
              "optim.weight_decay=0.1"]  # two parameter groups that differ (ZeRO-3's universal load merged them)
    args = [a for a in ds_args(fmnist, run_dir, *engine) if a not in ("--nproc", "2")]
    done = scaleyard(*args, "--nproc", str(before))
    assert done.returncode == 0, done.stderr[-3000:]
    kept = tmp_path / "reference_step12"
    reference = stop_after_step_8(run_dir, kept)

    resumed = scaleyard(*args, *RESUME, "--nproc", str(after))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_continuation(run_dir, reference, resumed.stdout + resumed.stderr, after)
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "step_00000008" / "deepspeed" / "zero").exists()  # never modified

    # optimizer state and EMA (ZeRO-3: per-rank partitions, merged and split again) moved, not restarted
    before = zero_moments(checkpoints / "step_00000008", tmp_path / "u8")
    after_move = zero_moments(checkpoints / "step_00000009", tmp_path / "u9")
    check_adam_continued(run_dir, before, after_move)
    shapes = {n: w.shape for n, w in full_weights(CheckpointRef(8, checkpoints / "step_00000008")).items()}
    check_adamw_step(run_dir, {n: s["fp32"] for n, s in before.items()}, {n: s["fp32"] for n, s in after_move.items()},
                     after_move, shapes)
    check_ema_continued(checkpoints, before)
    check_weights_close(full_weights(CheckpointRef(12, checkpoints / STEP12)), full_weights(CheckpointRef(12, kept)))


# --- megatron tensor parallelism -------------------------------------------------------------------
def megatron_moments(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Adam moments by parameter name, unsharded with the layout saved beside them."""
    from scaleyard.platform.engines.megatron_engine import consolidated_optimizer_state

    return consolidated_optimizer_state(sorted((checkpoint / "megatron").glob("tp_rank*.pt")))


@pytest.mark.slow  # CI budget: ZeRO-3 2 -> 1 stays in the default tier
def test_megatron_tp2_run_resumes_at_tp1(fmnist, tmp_path):
    pytest.importorskip("megatron.core")
    run_dir = tmp_path / "run"
    base = ["engine.name=megatron", "train.keep_checkpoints=3"]
    done = scaleyard(*tp_args(fmnist, run_dir, 2, *base, "engine.tp_size=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    kept = tmp_path / "reference_step12"
    reference = stop_after_step_8(run_dir, kept)

    resumed = scaleyard(*tp_args(fmnist, run_dir, 1, *base, "engine.tp_size=1", *RESUME))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_continuation(run_dir, reference, resumed.stdout + resumed.stderr, 1, TP_LOSS_TOLERANCE)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "step_00000008" / "megatron").iterdir()) == \
        ["tp_rank0.pt", "tp_rank1.pt"]  # never modified
    assert [p.name for p in (checkpoints / "step_00000009" / "megatron").iterdir()] == ["tp_rank0.pt"]

    before = megatron_moments(checkpoints / "step_00000008")
    after_move = megatron_moments(checkpoints / "step_00000009")
    check_adam_continued(run_dir, before, after_move)
    check_adamw_step(run_dir, full_weights(CheckpointRef(8, checkpoints / "step_00000008")),
                     full_weights(CheckpointRef(9, checkpoints / "step_00000009")), after_move)
    check_ema_continued(checkpoints, before)
    check_weights_close(full_weights(CheckpointRef(12, checkpoints / STEP12)), full_weights(CheckpointRef(12, kept)))


# --- DDP --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_run_resumes_at_one_rank(fmnist, tmp_path):
    """Replicated state: the 2-rank checkpoint loads as it is (this worked before elastic resume;
    the test pins it). Not bitwise: the noise of the samples rank 1 drew and the reduction order
    differ in the continuation."""
    run_dir = tmp_path / "run"
    args = [a for a in ds_args(fmnist, run_dir, "engine.name=ddp", "train.keep_checkpoints=3")
            if a not in ("--nproc", "2")]
    done = scaleyard(*args, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    kept = tmp_path / "reference_step12"
    reference = stop_after_step_8(run_dir, kept)
    resumed = scaleyard(*args, *RESUME, "--nproc", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_continuation(run_dir, reference, resumed.stdout + resumed.stderr, 1)
    checkpoints = run_dir / "checkpoints"
    before, after_move = (safe_load(checkpoints / f"step_0000000{s}" / "train_state.pt")["optimizer"]["state"]
                          for s in (8, 9))
    check_adam_continued(run_dir, before, after_move)
    weights8 = full_weights(CheckpointRef(8, checkpoints / "step_00000008"))
    check_ema_continued(checkpoints, [name for name, value in weights8.items() if value.is_floating_point()])
    check_weights_close(full_weights(CheckpointRef(12, checkpoints / STEP12)), full_weights(CheckpointRef(12, kept)))
    assert json.loads((checkpoints / STEP12 / "meta.json").read_text())["world_size"] == 1
