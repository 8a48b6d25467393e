"""A local `scaleyard run` stopped by SIGUSR1 or SIGTERM mid-run: it finishes its step, writes a
checkpoint at that step, exits with code 3 (requeue me), and the same command resumes from it (USR1:
to the weights of a run that never stopped)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scaleyard.platform.checkpoint import Checkpointer

from conftest import scaleyard


def run_args(classify_args, run_dir, steps):
    # constant lr: a run stopped at step s and resumed to s + 2 is the same run as one trained for s + 2 steps
    return ["run", "classify", "--preset", "tiny", *classify_args, f"train.steps={steps}", "train.ckpt_every=0",
            "train.log_every=1", "train.eval_every=0", "eval.max_samples=0", "optim.schedule=constant",
            f"run.dir={run_dir}"]


def progress_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def stop_mid_run(command, run_dir, signum, timeout=180):
    """Start `command`, send `signum` once the run is past step 3; returns (exit code, output)."""
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while progress_step(run_dir) < 3:  # training (and its signal handler) is running
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, output


@pytest.mark.parametrize("signum", [signal.SIGUSR1, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],  # CI budget
                         ids=["USR1", "TERM"])
def test_signal_checkpoints_exits_3_and_resumes_exactly(tmp_path, classify_args, signum):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *run_args(classify_args, run_dir, 100_000)]
    code, output = stop_mid_run(command, run_dir, signum, timeout=120)
    assert code == 3, output[-3000:]
    checkpoints = Checkpointer(run_dir / "checkpoints", 10).all()
    assert len(checkpoints) == 1, checkpoints  # train.ckpt_every=0: only the signal's checkpoint
    stopped = checkpoints[0].step
    assert stopped >= 3 and f"stopped by signal after step {stopped}" in output
    assert signal.Signals(signum).name in output
    assert not (run_dir / "summary.json").exists()

    resumed = scaleyard(*run_args(classify_args, run_dir, stopped + 2))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {checkpoints[0].path} (step {stopped})" in resumed.stdout + resumed.stderr
    if signum != signal.SIGUSR1:
        return  # the checkpoint is written by the same code for either signal: one exactness check is enough
    reference = scaleyard(*run_args(classify_args, tmp_path / "reference", stopped + 2))
    assert reference.returncode == 0, reference.stderr[-2000:]
    got, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, tmp_path / "reference"))
    assert got["step"] == expected["step"] == stopped + 2
    assert got["weights_sha256"] == expected["weights_sha256"]


def test_two_local_ranks_stop_on_a_signal_to_the_launcher(tmp_path, classify_args):
    """`scaleyard run --nproc 2`: the signal reaches the ranks (torchrun would die on USR1 and leave
    them training), both checkpoint the same step, and the launcher exits 3."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *run_args(classify_args, run_dir, 100_000),
               "--nproc", "2"]
    code, output = stop_mid_run(command, run_dir, signal.SIGUSR1)
    assert code == 3, output[-3000:]
    checkpoints = Checkpointer(run_dir / "checkpoints", 10).all()
    assert len(checkpoints) == 1 and checkpoints[0].step >= 3, checkpoints
    assert {p.name for p in checkpoints[0].path.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    resumed = scaleyard(*run_args(classify_args, run_dir, checkpoints[0].step + 2), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
