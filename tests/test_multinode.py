"""Multi-node on a real SLURM: the two-node cluster of slurm/cluster/start-2node.sh (nodes n1, n2
on this host, beside the single-node one; `make test` starts it). Commands reach it through
SLURM's own environment (SLURM_CONF), as a user would. Plus the rendezvous and pre-flight pieces
that need no cluster."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import scaleyard

CONF2 = os.environ.get("SCALEYARD_SLURM2_CONF", "/var/lib/scaleyard-slurm-2node/slurm.conf")
ENV2 = {"SLURM_CONF": CONF2}
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


@pytest.fixture(scope="module")
def two_nodes():
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                                                  text=True, env={**os.environ, **ENV2})
    if not up or up.returncode or {line.split()[0] for line in up.stdout.splitlines()} != {"n1", "n2"}:
        pytest.fail("no two-node SLURM cluster answers at SLURM_CONF=" + CONF2 +
                    ": `make test` starts one (or run `bash slurm/cluster/start-2node.sh`)")


def sy(*args: str, **kw) -> subprocess.CompletedProcess:
    return scaleyard(*args, env=ENV2, **kw)


def slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **ENV2}, timeout=60)


def status(run_dir: Path) -> dict:
    return json.loads(sy("status", str(run_dir), "--json").stdout)[0]


def wait_done(run_dir: Path, timeout: float) -> dict:
    deadline, row = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        row = status(run_dir)
        if row["state"].split()[0] in ENDED:
            return row
        time.sleep(2)
    raise AssertionError(f"{run_dir} did not finish in {timeout} s: {row}")


def wait_step(run_dir: Path, step: int, timeout: float) -> None:
    deadline, progress = time.monotonic() + timeout, run_dir / "progress.json"
    while not progress.exists() or json.loads(progress.read_text())["step"] < step:
        assert time.monotonic() < deadline, f"{run_dir} did not reach step {step} in {timeout} s"
        time.sleep(0.5)


def classify(fmnist, run_dir, steps, *extra):
    return ["classify", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            f"train.steps={steps}", "train.batch_size=64", "model.width=16", "model.hidden=64",
            "train.log_every=10", "data.shuffle_block=64", "eval.max_samples=100", f"run.dir={run_dir}", *extra]


def submit(*args: str) -> None:
    done = sy("submit", *args, "--cluster", "slurm")
    assert done.returncode == 0, done.stderr[-3000:]


def sha(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["weights_sha256"]


# --- rendezvous and pre-flight (no cluster needed) ----------------------------------------------

def test_rendezvous_falls_back_to_the_recorded_node_address_and_ports_follow_job_ids():
    from scaleyard.platform.distributed import master_address, rendezvous_port, slurm_rendezvous

    asked = []
    assert master_address("localhost", asked.append) == "localhost" and asked == []  # resolves: kept
    assert master_address("n1.does-not-resolve.invalid", lambda node: f"10.0.0.1 for {node}").startswith("10.0.0.1")
    with pytest.raises(RuntimeError, match="does not resolve and SLURM records no address"):
        master_address("n1.does-not-resolve.invalid", lambda node: "")
    env = {"SLURM_JOB_NODELIST": "n[1-2].does-not-resolve.invalid", "SLURM_JOB_ID": "41",
           "SLURM_CLUSTER_NAME": "scaleyard2"}
    got = slurm_rendezvous(env, node_addr=lambda node: {"n1.does-not-resolve.invalid": "127.0.0.7"}[node])
    assert got == {"MASTER_ADDR": "127.0.0.7", "MASTER_PORT": str(rendezvous_port(41, "scaleyard2"))}
    ports = [rendezvous_port(job, "scaleyard2") for job in range(1000, 1300)]
    assert len(set(ports)) == len(ports) and all(20000 <= p < 40000 for p in ports)  # concurrent jobs differ
    assert rendezvous_port(41, "scaleyard") != rendezvous_port(41, "scaleyard2")  # two clusters, one host


def _preflight_rank(rank: int, port: int, arrive: bool, queue) -> None:
    import torch

    from scaleyard.platform.distributed import DistEnv, PreflightError, init_process_group, preflight

    env = DistEnv(rank, 2, 0, "127.0.0.1", port, node=f"n{rank + 1}")
    init_process_group(env, "gloo", timeout_s=60)
    if not arrive:  # a rank whose node hangs after the rendezvous
        time.sleep(5)
        return
    try:
        preflight(env, torch.device("cpu"), timeout_s=3)
        queue.put("passed")
    except PreflightError as err:
        queue.put(str(err))


def test_preflight_names_the_rank_and_node_that_did_not_arrive():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = 29000 + os.getpid() % 1000
    ranks = [context.Process(target=_preflight_rank, args=(rank, port, rank == 0, queue)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    message = queue.get(timeout=60)
    for process in ranks:
        process.join(30)
    assert "pre-flight: rank 1 on n2 did not arrive within 3 s" in message, message
    assert message.startswith("rank 0 on n1"), message


# --- the two-node cluster -------------------------------------------------------------------------

@pytest.mark.slurm
def test_ddp_on_two_nodes_matches_one_node_and_status_logs_show_both_nodes(two_nodes, tmp_path, fmnist):
    """2 ranks on 2 nodes vs 2 ranks on 1 node: same world size and global batch, so the same
    gloo reductions in the same order; the final weights must agree bit for bit."""
    one_node, two = tmp_path / "one-node", tmp_path / "two-nodes"
    submit(*classify(fmnist, one_node, 40), "--nodes", "1", "--ntasks-per-node", "2")
    submit(*classify(fmnist, two, 40), "--profile", "local-2node")
    for run_dir in (one_node, two):
        assert wait_done(run_dir, 240)["state"] == "COMPLETED", status(run_dir)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert sha(two) == sha(one_node)

    row = status(two)
    assert row["nodes"] == {"n1": [0], "n2": [1]} and status(one_node)["nodes"] == {"n1": [0, 1]}
    assert "[ranks n1:0 n2:1]" in sy("status", str(two)).stdout
    for rank, node in ((0, "n1"), (1, "n2")):
        logs = sy("logs", str(two), "--rank", str(rank))
        assert logs.returncode == 0 and f"rank {rank} of 2 on node {node}" in logs.stdout, logs.stdout[-2000:]


@pytest.mark.slurm
def test_dry_run_shows_the_multi_node_script_and_srun_line(two_nodes, tmp_path, fmnist):
    done = sy("submit", *classify(fmnist, tmp_path / "run", 4), "--cluster", "slurm", "--profile", "local-2node",
              "--ntasks-per-node", "2", "--dry-run")
    assert done.returncode == 0, done.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "\nsrun --unbuffered --output ",
                 "# 2 node(s) x 2 task(s) per node = 4 ranks"):
        assert line in done.stdout, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_zero2_on_two_nodes_of_two_tasks_matches_four_ranks_on_one_node(two_nodes, tmp_path, fmnist):
    pytest.importorskip("deepspeed")
    engine = ["engine.name=deepspeed", "engine.zero_stage=2"]
    local, two = tmp_path / "one-node", tmp_path / "two-nodes"
    done = sy("run", *classify(fmnist, local, 20, *engine), "--nproc", "4", timeout=600)  # 4 ranks, this host
    assert done.returncode == 0, done.stderr[-3000:]
    submit(*classify(fmnist, two, 20, *engine), "--profile", "local-2node", "--ntasks-per-node", "2")
    assert wait_done(two, 480)["state"] == "COMPLETED", status(two)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 4
    assert status(two)["nodes"] == {"n1": [0, 1], "n2": [2, 3]}
    assert sha(two) == sha(local)


@pytest.fixture(scope="module")
def two_node_reference(two_nodes, tmp_path_factory, fmnist):
    """An uninterrupted 2-node run that the interrupted ones must end equal to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    submit(*classify(fmnist, run_dir, 300, "train.ckpt_every=50"), "--profile", "local-2node")
    assert wait_done(run_dir, 300)["state"] == "COMPLETED", status(run_dir)
    return run_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_two_node_job_requeues_and_resumes_bitwise(two_node_reference, tmp_path, fmnist):
    run_dir = tmp_path / "preempted"
    submit(*classify(fmnist, run_dir, 300, "train.ckpt_every=50"), "--profile", "local-2node")
    wait_step(run_dir, 30, 180)
    job = json.loads((run_dir / "submission.json").read_text())["job_id"]
    assert slurm("scancel", "--signal=USR2", job).returncode == 0  # reaches every task on both nodes
    row = wait_done(run_dir, 300)
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    assert sha(run_dir) == sha(two_node_reference)
    logs = sy("logs", str(run_dir), "--rank", "1")
    assert "resumed from" in logs.stdout and "on node n2" in logs.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_a_node_that_dies_mid_run_ends_the_attempt_in_bounded_time_and_the_requeue_resumes(
        two_node_reference, tmp_path, fmnist):
    run_dir = tmp_path / "node-dies"
    submit(*classify(fmnist, run_dir, 300, "train.ckpt_every=50"), "--profile", "local-2node")
    wait_step(run_dir, 60, 180)  # past the first checkpoint
    job = json.loads((run_dir / "submission.json").read_text())["job_id"]
    downed = time.monotonic()
    try:
        assert slurm("scontrol", "update", "nodename=n2", "state=down", "reason=scaleyard-test").returncode == 0
        while status(run_dir)["state"] == "RUNNING":  # SLURM kills the job on both nodes: never a hang
            assert time.monotonic() - downed < 60, "the job still runs 60 s after its node went down"
            time.sleep(1)
        row = status(run_dir)  # not FAILED: SLURM requeues it (JobRequeue), and status says so
        assert row["state"] in ("REQUEUED", "PENDING"), row
        assert slurm("squeue", "-h", "-j", job).stdout.strip(), "the job left the queue instead of requeueing"
    finally:
        slurm("scontrol", "update", "nodename=n2", "state=resume")
    row = wait_done(run_dir, 300)  # the node is back: the requeued job resumes from its checkpoint
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    assert "resumed from" in sy("logs", str(run_dir)).stdout
    assert sha(run_dir) == sha(two_node_reference)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_node_killed_outright_is_declared_down_and_the_job_requeues_in_bounded_time(
        two_node_reference, tmp_path, fmnist):
    """n2 dies for real: its slurmd, the step daemon and rank 1 are SIGKILLed. Rank 0's collective
    fails at once, but only the controller can end the job: it declares n2 down after
    SlurmdTimeout (20 s in start-2node.sh) and requeues the job; nothing waits forever."""
    run_dir = tmp_path / "node-killed"
    submit(*classify(fmnist, run_dir, 300, "train.ckpt_every=50"), "--profile", "local-2node")
    wait_step(run_dir, 60, 180)
    record = json.loads((run_dir / "logs" / "rank1.json").read_text())
    assert record["state"] == "RUNNING", record
    step_daemon = int(Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    slurmd = int((Path(CONF2).parent / "pids" / "slurmd-n2.pid").read_text())
    killed = time.monotonic()
    try:
        for pid in (slurmd, step_daemon, record["pid"]):
            os.kill(pid, signal.SIGKILL)
        while status(run_dir)["state"] == "RUNNING":
            assert time.monotonic() - killed < 90, "the job still runs 90 s after its node died"
            time.sleep(2)
        row = status(run_dir)
        assert row["state"] in ("REQUEUED", "PENDING"), row
    finally:
        slurm("slurmd", "-f", CONF2, "-N", "n2")  # the node comes back (ReturnToService=2)
    row = wait_done(run_dir, 300)
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    assert sha(run_dir) == sha(two_node_reference)


@pytest.mark.slurm
@pytest.mark.slow
def test_megatron_tp2_by_dp2_on_two_nodes_matches_four_ranks_on_one_host(two_nodes, tmp_path, fmnist):
    """Tensor parallelism inside each node (ranks 0,1 on n1; 2,3 on n2), data parallelism across."""
    pytest.importorskip("megatron.core")
    args = ["t2i", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            "model.preset=dit_adaln-cpu-xs", "train.steps=4", "train.ckpt_every=0", "train.log_every=1",
            "eval.samples=0", "eval.val_samples=32", "engine.name=megatron", "engine.tp_size=2"]
    local, two = tmp_path / "one-host", tmp_path / "two-nodes"
    done = sy("run", *args, f"run.dir={local}", "--nproc", "4", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    submit(*args, f"run.dir={two}", "--profile", "local-2node", "--ntasks-per-node", "2")
    assert wait_done(two, 480)["state"] == "COMPLETED", status(two)
    assert status(two)["nodes"] == {"n1": [0, 1], "n2": [2, 3]}
    assert sha(two) == sha(local)


@pytest.mark.slurm
@pytest.mark.slow
def test_job_array_of_two_node_jobs_running_at_once_on_the_same_nodes(two_nodes, tmp_path, fmnist):
    """Two array elements, each a 2-node job, share n1 and n2 at the same time: their rendezvous
    ports differ (derived from their job ids), so both complete."""
    from scaleyard.slurm.launch import submit_array
    from scaleyard.slurm.profiles import load_profile
    from scaleyard.slurm.task import RunTask

    sweep = tmp_path / "sweep"
    tasks = [RunTask("classify", "tiny", [*classify(fmnist, sweep / f"run{i}", 150)[3:], f"run.seed={i}"],
                     str(sweep / f"run{i}")) for i in range(2)]
    os.environ["SLURM_CONF"] = CONF2  # submit_array runs in this process: sbatch reads it
    try:
        submissions = submit_array(tasks, "slurm", load_profile("local-2node"), "sy-array2", sweep / "slurm",
                                   concurrency=2)
    finally:
        del os.environ["SLURM_CONF"]
    assert all("_" in s.job_id for s in submissions)
    rows = [wait_done(sweep / f"run{i}", 300) for i in range(2)]
    assert all(row["state"] == "COMPLETED" and row["nodes"] == {"n1": [0], "n2": [1]} for row in rows), rows
    ports = set()
    for i in range(2):
        for rank in range(2):
            said = sy("logs", str(sweep / f"run{i}"), "--rank", str(rank)).stdout
            ports.add((i, said.split("rendezvous ")[1].split(")")[0]))
    assert len(ports) == 2 and len({port for _, port in ports}) == 2, ports  # one port per job, on both ranks
    starts = [json.loads((sweep / f"run{i}" / "attempts.jsonl").read_text())["time"] for i in range(2)]
    ends = [(sweep / f"run{i}" / "summary.json").stat().st_mtime for i in range(2)]
    assert max(starts) < min(ends), "the two 2-node jobs did not overlap"
