"""Real SLURM (the local cluster that `make test` starts with slurm/cluster/start.sh):
submission, preemption -> requeue -> exact resume, arrays, status/logs/cancel, bad input."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import scaleyard, scaleyard_in_process

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sinfo") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode:
        pytest.fail("no SLURM cluster answers: `make test` starts one (or run `bash slurm/cluster/start.sh`)")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def wait_done(run_dir: Path, timeout: float, states=ENDED) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = json.loads(scaleyard("status", str(run_dir), "--json").stdout)
        if rows and rows[0]["state"].split()[0] in states and rows[0]["state"] != "RUNNING":
            return rows[0]
        time.sleep(2)
    raise AssertionError(f"{run_dir} did not finish in {timeout} s: {rows}")


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "submission.json").read_text())["job_id"]


def classify(fmnist, run_dir, steps):
    return ["classify", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            f"train.steps={steps}", "train.batch_size=64", "model.width=16", "model.hidden=64",
            "train.ckpt_every=250", "train.log_every=50", "data.shuffle_block=64", f"run.dir={run_dir}"]


# slow: at least three 1-minute SLURM attempts plus requeue delays (4-5 minutes on 2 quiet cores);
# the default tier keeps scancel-checkpoints-and-stays-cancelled on SLURM and the local USR1 stop
@pytest.mark.slow
def test_preempted_twice_ends_with_the_uninterrupted_weights(tmp_path, fmnist):
    steps = 1500
    reference = tmp_path / "reference"
    done = scaleyard("submit", *classify(fmnist, reference, steps), "--cluster", "slurm", "--ntasks-per-node", "2")
    assert done.returncode == 0, done.stderr
    assert wait_done(reference, 300)["state"] == "COMPLETED"
    ref = json.loads((reference / "summary.json").read_text())
    assert ref["world_size"] == 2 and ref["step"] == steps

    run_dir = tmp_path / "preempted"
    profile = tmp_path / "short.yaml"  # a real 1-minute limit: SLURM's own USR2 ends attempt 2
    profile.write_text("time_min: 1\nsignal_delay_s: 20\nmax_requeues: 5\nntasks_per_node: 2\n")
    done = scaleyard("submit", *classify(fmnist, run_dir, steps), "--cluster", "slurm", "--profile", str(profile))
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 120
    while not (run_dir / "progress.json").exists() or json.loads((run_dir / "progress.json").read_text())["step"] < 100:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id(run_dir)], check=True)  # preemption 1
    row = wait_done(run_dir, 480)
    assert row["state"] == "COMPLETED", row
    assert row["requeues"] >= 2, row  # the signal above and at least one real time limit
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_sha256"] == ref["weights_sha256"]

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = [e.step for e in events.Scalars("train/loss")]
    assert logged == list(range(50, steps + 1, 50))  # no duplicated or missing steps across requeues

    logs = scaleyard("logs", str(run_dir), "--rank", "1")
    assert logs.returncode == 0 and "resumed from" in logs.stdout


@pytest.mark.slow  # CI budget: job arrays of two-node jobs run in the slow tier too; the local array stays
def test_array_of_four_and_status(tmp_path, fmnist):
    from scaleyard.slurm.launch import submit_array
    from scaleyard.slurm.profiles import load_profile
    from scaleyard.slurm.task import RunTask

    sweep = tmp_path / "sweep"
    tasks = []
    for i in range(4):
        args = classify(fmnist, sweep / f"run{i}", 20)
        overrides = [a for a in args[3:]] + [f"run.seed={i}"]
        tasks.append(RunTask("classify", "tiny", overrides, str(sweep / f"run{i}")))
    started = time.monotonic()
    submissions = submit_array(tasks, "slurm", load_profile("local"), "sy-array", sweep / "slurm", concurrency=2)
    assert time.monotonic() - started < 10
    assert len({s.job_id for s in submissions}) == 4 and all("_" in s.job_id for s in submissions)
    for i in range(4):
        wait_done(sweep / f"run{i}", 240)
    rows = json.loads(scaleyard("status", str(sweep), "--json").stdout)
    assert [Path(r["run"]).name for r in rows] == ["run0", "run1", "run2", "run3"]
    assert all(r["state"] == "COMPLETED" and r["step"] == 20 for r in rows), rows
    table = scaleyard("status", str(sweep)).stdout
    assert table.count("COMPLETED") == 4


def test_local_executor_array_respects_concurrency(tmp_path, fmnist):
    from scaleyard.slurm.launch import submit_array
    from scaleyard.slurm.profiles import load_profile
    from scaleyard.slurm.task import RunTask

    tasks = [RunTask("classify", "tiny", classify(fmnist, tmp_path / f"r{i}", 10)[3:], str(tmp_path / f"r{i}"))
             for i in range(3)]
    submit_array(tasks, "local", load_profile("local"), "sy-local", tmp_path / "submitit", concurrency=2)
    for i in range(3):
        row = wait_done(tmp_path / f"r{i}", 120)
        assert row["state"] == "COMPLETED" and row["job_id"] == "", row  # SLURM's word; no pid as a job id
    starts = sorted(json.loads((tmp_path / f"r{i}" / "attempts.jsonl").read_text())["time"] for i in range(3))
    finished_first_wave = min((tmp_path / f"r{i}" / "summary.json").stat().st_mtime for i in range(2))
    assert starts[2] >= finished_first_wave - 1  # the third run waited for the first wave


def test_dry_run_shows_profile_and_quotes_injection(tmp_path, fmnist):
    profile = tmp_path / "lab.yaml"
    profile.write_text("partition: debug\naccount: my-lab\nqos: normal\ntime_min: 30\nsignal_delay_s: 45\n"
                       "setup: ['export NCCL_DEBUG=WARN']\nsbatch_extra: {exclusive: ''}\n")
    marker = tmp_path / "pwned"
    evil = f"data.path=x$(touch {marker})`touch {marker}`;\n#SBATCH --partition=evil"
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    done = scaleyard("submit", "classify", "--cluster", "slurm", "--profile", str(profile), "--dry-run", evil,
                     f"run.dir={tmp_path}/run")
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for directive in ("#SBATCH --partition=debug", "#SBATCH --account=my-lab", "#SBATCH --qos=normal",
                      "#SBATCH --time=30", "#SBATCH --signal=USR2@45", "#SBATCH --exclusive", "export NCCL_DEBUG=WARN"):
        assert directive in script, directive
    assert "\n#SBATCH --partition=evil" not in script
    assert json.dumps(evil) in script  # shown JSON-quoted on one comment line
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    bad_name = scaleyard("submit", "classify", "--cluster", "slurm", "--dry-run", "--name", "a\n#SBATCH --x=1")
    assert bad_name.returncode == 2 and "job name" in bad_name.stderr


@pytest.mark.parametrize("args,message", [
    (["--profile", "no-such-profile"], "unknown cluster profile 'no-such-profile'"),
    (["--profile", "{profile}"], "partition 'gpu' does not exist; sinfo lists: debug"),
    (["--ntasks-per-node", "4"], "no node in the default partition has 4 CPUs"),
    (["--gpus-per-node", "8"], "8 GPUs"),
    (["--time", "0"], "time_min must be at least 1"),
    (["--nodes", "2"], "2 nodes requested but the default partition has only 1"),
])
def test_bad_requests_fail_before_queueing(tmp_path, args, message):
    profile = tmp_path / "gpu.yaml"
    profile.write_text("partition: gpu\n")
    args = [a.format(profile=profile) for a in args]
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    command = ("submit", "classify", "--cluster", "slurm", *args, f"run.dir={tmp_path}/run")
    if args[0] == "--profile" and "no-such" in args[1]:  # one case through a real process, the rest in this one
        done = scaleyard(*command)
        code, stderr = done.returncode, done.stderr
    else:
        code, stderr = scaleyard_in_process(*command)
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_time_limit_must_exceed_signal_delay(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("time_min: 1\nsignal_delay_s: 90\n")
    code, stderr = scaleyard_in_process("submit", "classify", "--cluster", "slurm", "--profile", str(profile),
                                        "--dry-run")
    assert code == 2 and "not longer than the warning signal delay" in stderr


def test_cancel_checkpoints_before_it_stops_and_stays_cancelled(tmp_path, fmnist):
    """`scaleyard cancel` (scancel: TERM) of a running 2-task job: every rank finishes its step, the
    checkpoint is written before the job stops, no requeue follows, and the checkpoint resumes."""
    run_dir = tmp_path / "long"
    # ckpt_every=0: the only checkpoint before the end is the one the cancellation writes
    args = [*classify(fmnist, run_dir, 1_000_000), "train.ckpt_every=0", "train.log_every=5"]
    done = scaleyard("submit", *args, "--cluster", "slurm", "--ntasks-per-node", "2")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 600  # the local cluster runs one 2-task job at a time: it may queue
    progress = run_dir / "progress.json"
    while not progress.exists() or json.loads(progress.read_text())["step"] < 20:  # both ranks are training
        assert time.monotonic() < deadline, "the job did not reach step 20"
        time.sleep(0.5)

    cancelled = scaleyard("cancel", str(run_dir))
    assert cancelled.returncode == 0 and job_id(run_dir) in cancelled.stdout, cancelled.stdout + cancelled.stderr
    assert wait_done(run_dir, 90)["state"].startswith("CANCELLED")
    checkpoints = sorted(run_dir.glob("checkpoints/step_*/meta.json"))
    assert len(checkpoints) == 1, checkpoints
    stopped = json.loads(checkpoints[0].read_text())["step"]
    assert stopped >= 20 and (checkpoints[0].parent / "rng_rank1.pt").exists()  # both ranks took part
    logs = scaleyard("logs", str(run_dir), "--rank", "1")
    assert f"stopped by signal after step {stopped}" in logs.stdout + logs.stderr

    time.sleep(5)  # a requeued job would be back in the queue by now
    row = json.loads(scaleyard("status", str(run_dir), "--json").stdout)[0]
    assert row["state"].startswith("CANCELLED") and row["requeues"] == 0, row
    assert not (run_dir / "summary.json").exists()
    # the checkpoint is complete: the run resumes from it (here locally, 2 more steps)
    resumed = scaleyard("run", *args, f"train.steps={stopped + 2}")  # the later override wins
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints[0].parent}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == stopped + 2


def test_command_line_sweep_on_slurm_reports_the_failed_run_and_why(tmp_path, fmnist):
    sweep_dir = tmp_path / "sweep"
    good, bad = f"{fmnist}/train", str(tmp_path / "no-such-data")
    done = scaleyard("sweep", "classify", "--preset", "tiny", f"data.path={good},{bad}",
                     f"data.eval_path={fmnist}/test", "train.steps=4", "--cluster", "slurm", "--dir", str(sweep_dir),
                     "--wait", timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr  # not every run completed
    assert "1/2 completed, 0 running, 1 failed" in done.stdout, done.stdout
    rows = {Path(r["run"]).name: r for r in json.loads(scaleyard("status", str(sweep_dir), "--json").stdout)}
    failed = next(row for name, row in rows.items() if "no-such-data" in name)
    completed = next(row for name, row in rows.items() if "no-such-data" not in name)
    assert completed["state"] == "COMPLETED" and completed["best"] and "_" in completed["job_id"]  # an array task
    assert failed["state"] == "FAILED" and "DataError" in failed["reason"] and "no-such-data" in failed["reason"]
    run_dir = Path(failed["run"])
    assert "Traceback" in (run_dir / "logs" / "rank0.log").read_text()  # submitted runs keep a log too
    logs = scaleyard("logs", str(run_dir))
    assert logs.returncode == 0 and "no-such-data" in logs.stdout + logs.stderr
