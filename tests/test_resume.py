"""Exact resume through the real CLI: a run SIGKILLed twice (once while writing its first
checkpoint, once while writing its last) and restarted by the same command ends with the same
weights as one that never stopped, for 1 rank and for 2 gloo ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scaleyard.platform.checkpoint import PAUSE_ENV

from conftest import scaleyard


def run_args(classify_args, run_dir, nproc):
    return ["run", "classify", "--preset", "tiny", *classify_args, "train.steps=30", "train.ckpt_every=10",
            "train.log_every=5", "train.eval_every=10", f"run.dir={run_dir}", "--nproc", str(nproc)]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def kill_while_writing(command, checkpoints, step):
    """Start the run with a pause injected into checkpoint `step`'s write; SIGKILL all its
    processes once that checkpoint's state is on disk but not yet published."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: f"60@{step}"}
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (checkpoints / f".tmp-step_{step:08d}" / "train_state.pt").exists():
        assert process.poll() is None, "the run ended before reaching the checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let torch.save finish: the kill lands in the pause before the rename
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow), 2])  # CI budget: 2 ranks by default
def test_sigkill_during_checkpoint_then_resume_is_exact(tmp_path, classify_args, nproc):
    reference = tmp_path / "reference"
    done = scaleyard(*run_args(classify_args, reference, nproc))
    assert done.returncode == 0, done.stdout + done.stderr

    run_dir = tmp_path / "interrupted"
    checkpoints = run_dir / "checkpoints"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *run_args(classify_args, run_dir, nproc)]

    if nproc == 1:  # CI budget: the kill inside the first checkpoint only in the slow tier
        kill_while_writing(command, checkpoints, 10)
        assert not (checkpoints / "step_00000010").exists()  # a half-written checkpoint never looks valid

    kill_while_writing(command, checkpoints, 30)  # (re)starts from scratch, dies writing the last one
    assert not (checkpoints / "step_00000030").exists()  # a half-written checkpoint never looks valid
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000010", "step_00000020"]
    assert not (run_dir / "summary.json").exists()

    resumed = scaleyard(*run_args(classify_args, run_dir, nproc))  # from step 20
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert summary(run_dir)["weights_sha256"] == summary(reference)["weights_sha256"]
    assert summary(run_dir)["final_loss"] == summary(reference)["final_loss"]
    assert not list(checkpoints.glob(".tmp-*"))

    again = scaleyard(*run_args(classify_args, run_dir, nproc))
    assert again.returncode == 0 and "already finished" in again.stdout
