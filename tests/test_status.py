"""`status`, `logs` and `cancel` on local runs (`scaleyard run`, `--nproc 2`): SLURM's state words,
FAILED with the reason, a log per rank in every run folder, machine-readable `status --json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import scaleyard


def run_args(classify_args, run_dir, *extra):
    return ["run", "classify", "--preset", "tiny", *classify_args, f"run.dir={run_dir}", *extra]


def status(path: Path) -> list[dict]:
    done = scaleyard("status", str(path), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # nothing but JSON on stdout


def start(classify_args, *run_dirs: Path) -> list[subprocess.Popen]:
    """Long runs in the background, returned once each has logged its first progress."""
    processes = [subprocess.Popen([sys.executable, "-m", "scaleyard.platform.cli",
                                   *run_args(classify_args, run_dir, "train.steps=100000")],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for run_dir in run_dirs]
    deadline = time.monotonic() + 90
    for process, run_dir in zip(processes, run_dirs):
        while not (run_dir / "progress.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
    return processes


def test_finished_local_run_with_two_ranks(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    done = scaleyard(*run_args(classify_args, run_dir, "--nproc", "2", "train.steps=6"))
    assert done.returncode == 0, done.stderr
    [row] = status(run_dir)
    assert row["state"] == "COMPLETED" and row["reason"] == ""  # SLURM's word, not FINISHED
    assert row["job_id"] == "" and row["cluster"] == "local"  # no pid posing as a job id
    assert row["step"] == 6 and row["steps"] == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["metric"] == "eval.accuracy" and row["metric_value"] == summary["eval"]["accuracy"]
    table = scaleyard("status", str(run_dir)).stdout.splitlines()
    assert "metric" in table[0] and "COMPLETED" in table[1] and "local" in table[1] and "6/6" in table[1]
    for rank in (0, 1):
        logs = scaleyard("logs", str(run_dir), "--rank", str(rank))
        assert logs.returncode == 0, logs.stderr
        assert f"[rank {rank}]" in logs.stdout and "started (pid" in logs.stdout
    assert "eval step 6" in scaleyard("logs", str(run_dir)).stdout  # rank 0 logs the evaluation
    missing = scaleyard("logs", str(run_dir), "--rank", "5")
    assert missing.returncode == 2 and "rank0.log, rank1.log" in missing.stderr


def test_a_run_that_raises_is_failed_with_the_reason(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    args = [a for a in run_args(classify_args, run_dir) if not a.startswith("data.path=")]
    done = scaleyard(*args, f"data.path={tmp_path}/no-such-data")
    assert done.returncode == 2
    [row] = status(run_dir)
    assert row["state"] == "FAILED", row
    assert "DataError" in row["reason"] and "no-such-data" in row["reason"], row
    table = scaleyard("status", str(run_dir)).stdout  # the table cuts long reasons to fit its column
    assert "FAILED" in table and "DataError: no shard index at" in table, table
    logs = scaleyard("logs", str(run_dir)).stdout
    assert "Traceback" in logs and "no-such-data" in logs  # the traceback is kept in the run's log


def test_running_then_killed_or_cancelled(tmp_path, classify_args):
    killed, cancelled = tmp_path / "killed", tmp_path / "cancelled"
    process, other = start(classify_args, killed, cancelled)
    assert [row["state"] for row in status(tmp_path)] == ["RUNNING", "RUNNING"]
    os.killpg(process.pid, signal.SIGKILL)  # no handler runs: only the dead pid tells
    process.wait()
    [row] = status(killed)
    assert row["state"] == "FAILED" and "killed" in row["reason"], row

    done = scaleyard("cancel", str(cancelled))
    assert done.returncode == 0 and "cancelled pid" in done.stdout, done.stdout + done.stderr
    assert other.wait(timeout=60) == 3  # checkpointed and stopped (TERM: not requeued)
    [row] = status(cancelled)
    assert row["state"] == "CANCELLED", row
    again = scaleyard("cancel", str(cancelled))
    assert again.returncode == 0 and "nothing to cancel" in again.stdout
