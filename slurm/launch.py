"""Queue runs through submitit: one run, or many as one job array; dry runs print the sbatch
script instead. `LocalExecutor` (cluster "local") and SLURM (cluster "slurm") share this path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import submitit

from scaleyard.platform.launcher import RunRequest
from scaleyard.slurm.profiles import ClusterProfile, check_job_name, check_profile, load_profile
from scaleyard.slurm.task import RunTask

CLUSTERS = ("local", "slurm")
SUBMISSION_FILE = "submission.json"


@dataclass
class Submission:
    job_id: str
    cluster: str
    folder: str  # submitit's folder (logs, pickles)
    profile: str
    tasks: int
    submitted: float


def make_executor(cluster: str, profile: ClusterProfile, folder: Path, job_name: str,
                  array_parallelism: int | None = None) -> submitit.AutoExecutor:
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster {cluster!r}: choose one of {', '.join(CLUSTERS)}")
    check_job_name(job_name)
    check_profile(profile, cluster)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=profile.max_requeues,
                                     local_max_num_timeout=profile.max_requeues)
    params: dict[str, Any] = {
        "name": job_name, "timeout_min": profile.time_min, "nodes": profile.nodes,
        "tasks_per_node": profile.ntasks_per_node, "cpus_per_task": profile.cpus_per_task,
        "gpus_per_node": profile.gpus_per_node,
    }
    if profile.mem_gb:
        params["mem_gb"] = profile.mem_gb
    if cluster == "slurm":
        extra = {k: (True if v == "" else v) for k, v in profile.sbatch_extra.items()}
        params.update({"slurm_signal_delay_s": profile.signal_delay_s, "slurm_setup": list(profile.setup),
                       "slurm_additional_parameters": extra})
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key):
                params[f"slurm_{key}"] = getattr(profile, key)
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The batch script submitit would hand to sbatch (SLURM executors only)."""
    inner = executor._executor  # submitit keeps the cluster-specific executor here
    if not hasattr(inner, "_make_submission_file_text"):
        return f"# cluster {executor.cluster}: no batch script (processes are started directly)\n"
    script = inner._make_submission_file_text(inner._submitit_command_str, "DRY-RUN")
    nodes, per_node = inner.parameters.get("nodes", 1), inner.parameters.get("ntasks_per_node", 1)
    # what the srun line above becomes: the layout and the rendezvous every rank derives
    return script + (f"\n# {nodes} node(s) x {per_node} task(s) per node = {nodes * per_node} ranks: srun starts one "
                     "task per rank (SLURM_PROCID = rank, block order: node 1 holds ranks "
                     f"0-{per_node - 1}).\n# Rendezvous: MASTER_ADDR = the allocation's first node (its name when "
                     "it resolves, else its NodeAddr from `scontrol show node`); MASTER_PORT = 20000 + "
                     "(job id + crc32(cluster name)) % 20000.\n")


def _record(task: RunTask, job: submitit.Job, cluster: str, folder: Path, profile: ClusterProfile) -> Submission:
    """Write the run's submission.json (what status, logs and cancel read back)."""
    submission = Submission(str(job.job_id), cluster, str(folder), profile.name, profile.world_size, time.time())
    Path(task.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(task.run_dir) / SUBMISSION_FILE).write_text(json.dumps(asdict(submission), indent=1))
    return submission


def submit_run(task: RunTask, cluster: str, profile: ClusterProfile, job_name: str) -> Submission:
    folder = Path(task.run_dir) / "slurm"
    executor = make_executor(cluster, profile, folder, job_name)
    return _record(task, executor.submit(task), cluster, folder, profile)


def submit_array(tasks: list[RunTask], cluster: str, profile: ClusterProfile, job_name: str, folder: Path,
                 concurrency: int, on_wait: Callable[[], None] | None = None) -> list[Submission]:
    """Many runs as one job array, at most `concurrency` at a time. On SLURM this is one sbatch
    with `--array=0-N%concurrency`; locally the same limit is kept by starting each run when a
    slot frees up (this call then returns when the last run has started, calling `on_wait`
    while it waits)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    submissions = []
    if cluster == "slurm":
        executor = make_executor(cluster, profile, folder, job_name, array_parallelism=concurrency)
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        submissions = [_record(task, job, cluster, folder, profile) for task, job in zip(tasks, jobs)]
    else:
        # submitit's local executor has no array throttle: keep `concurrency` runs going and start
        # the next one as soon as any ends (this call returns once the last one has started).
        executor = make_executor(cluster, profile, folder, job_name)
        running: list[submitit.Job] = []
        for task in tasks:
            while len(running) >= concurrency:
                running = [job for job in running if not job.done()]
                if len(running) >= concurrency:
                    if on_wait is not None:
                        on_wait()
                    time.sleep(0.5)
            job = executor.submit(task)
            running.append(job)
            submissions.append(_record(task, job, cluster, folder, profile))
    return submissions


def job_of(submission: Submission) -> submitit.Job:
    if submission.cluster == "slurm":
        return submitit.SlurmJob(submission.folder, submission.job_id, tasks=tuple(range(submission.tasks)))
    return submitit.LocalJob(submission.folder, submission.job_id, tasks=tuple(range(submission.tasks)))


def read_submission(run_dir: Path) -> Submission | None:
    path = Path(run_dir) / SUBMISSION_FILE
    return Submission(**json.loads(path.read_text())) if path.exists() else None


class SubmititLauncher:
    """The platform's `Launcher` (platform/launcher.py) through submitit: local processes
    (cluster "local") or SLURM job arrays (cluster "slurm") with a cluster profile."""

    def __init__(self, cluster: str, profile: ClusterProfile):
        if cluster not in CLUSTERS:
            raise ValueError(f"--cluster {cluster!r}: choose one of {', '.join(CLUSTERS)}")
        check_profile(profile, cluster)  # before anything is written or queued
        self.cluster, self.profile = cluster, profile
        self.world_size = profile.world_size
        self.gpu_memory_gb = profile.gpu_memory_gb or None
        self.runs_here = cluster == "local"

    @classmethod
    def from_profile(cls, cluster: str, profile: str | None) -> SubmititLauncher:
        return cls(cluster, load_profile(profile or "local"))

    def submit_array(self, runs: list[RunRequest], name: str, folder: Path, concurrency: int,
                     on_wait: Callable[[], None] | None = None) -> None:
        tasks = [RunTask(run.job, run.preset, run.overrides, run.run_dir) for run in runs]
        submit_array(tasks, self.cluster, self.profile, name, folder, concurrency, on_wait)

    def state(self, run_dir: Path) -> str:
        from scaleyard.slurm.monitor import run_state  # monitor imports this module

        return run_state(Path(run_dir))
