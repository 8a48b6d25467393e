"""`scaleyard cancel` (scancel, TERM) of a running SLURM job: every rank finishes its step and the
checkpoint is written before the job stops; the job stays cancelled (no requeue), and the
checkpoint resumes."""

import json
import time

import pytest
from test_slurm import cluster, job_id, wait_done  # noqa: F401 - `cluster`: the autouse cluster check

from scaleyard.platform.checkpoint import Checkpointer

from conftest import scaleyard

pytestmark = pytest.mark.slurm


def classify(fmnist, run_dir, steps):
    # ckpt_every=0: the only checkpoint before the end is the one the cancellation writes
    return ["classify", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            f"train.steps={steps}", "train.ckpt_every=0", "train.log_every=5", "eval.max_samples=0",
            f"run.dir={run_dir}"]


def test_scancel_checkpoints_before_it_stops_and_stays_cancelled(tmp_path, fmnist):
    run_dir = tmp_path / "long"
    done = scaleyard("submit", *classify(fmnist, run_dir, 1_000_000), "--cluster", "slurm", "--ntasks-per-node", "2")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 600  # the local cluster runs one 2-task job at a time: it may queue
    progress = run_dir / "progress.json"
    while not progress.exists() or json.loads(progress.read_text())["step"] < 20:  # both ranks are training
        assert time.monotonic() < deadline, "the job did not reach step 20"
        time.sleep(0.5)

    cancelled = scaleyard("cancel", str(run_dir))
    assert cancelled.returncode == 0 and job_id(run_dir) in cancelled.stdout, cancelled.stdout + cancelled.stderr
    row = wait_done(run_dir, 90)
    assert row["state"].startswith("CANCELLED"), row
    checkpoints = Checkpointer(run_dir / "checkpoints", 10).all()
    assert len(checkpoints) == 1 and checkpoints[0].step >= 20, checkpoints
    stopped = checkpoints[0].step
    assert (checkpoints[0].path / "rng_rank1.pt").exists()  # both ranks took part
    logs = scaleyard("logs", str(run_dir), "--rank", "1")
    assert f"stopped by signal after step {stopped}" in logs.stdout + logs.stderr

    time.sleep(5)  # a requeued job would be back in the queue by now
    row = json.loads(scaleyard("status", str(run_dir), "--json").stdout)[0]
    assert row["state"].startswith("CANCELLED") and row["requeues"] == 0, row
    assert not (run_dir / "summary.json").exists()

    # the checkpoint is complete: the run resumes from it (here locally, 2 more steps)
    resumed = scaleyard("run", *classify(fmnist, run_dir, stopped + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints[0].path}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == stopped + 2
