"""`scaleyard status | cancel | logs`: what runs are doing, from their run folders and the queue.

One state vocabulary everywhere, SLURM's (`scaleyard.platform.run_record.STATES`): for submitted
SLURM runs the queue's word (normalised), for local runs (`scaleyard run`, `--nproc`, the local
executor) the rank records each rank keeps in `run_dir/logs/`. A FAILED run carries its reason: the
failing rank's exception, or the last error line of the job's stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from scaleyard.platform.run_record import (
    CANCELLED,
    FAILED,
    FALLBACKS,
    PENDING,
    REQUEUED,
    RUNNING,
    STATES,
    TIMEOUT,
    alive_here,
    files_row,
    log_file,
    pid_alive,
    read_records,
)  # fmt: skip
from scaleyard.slurm.launch import SUBMISSION_FILE, Submission, job_of, read_submission
from scaleyard.slurm.task import PLACEMENT

# SLURM job states outside the common vocabulary -> (state, reason)
SLURM_STATES = {
    "COMPLETING": (RUNNING, ""), "CONFIGURING": (PENDING, ""), "SUSPENDED": (PENDING, "suspended"),
    "STOPPED": (PENDING, "stopped"), "RESIZING": (RUNNING, ""), "REQUEUE_HOLD": (REQUEUED, "held"),
    "REQUEUE_FED": (REQUEUED, ""), "OUT_OF_MEMORY": (FAILED, "out of memory (SLURM)"),
    "NODE_FAIL": (FAILED, "node failure"), "BOOT_FAIL": (FAILED, "node boot failure"),
    "DEADLINE": (TIMEOUT, "deadline"), "REVOKED": (CANCELLED, "revoked"), "SPECIAL_EXIT": (FAILED, "special exit"),
}  # fmt: skip
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:.*)?$")


def run_dirs(path: Path) -> list[Path]:
    """A run folder (with the stages it trains first, platform/stages.py), or every run folder
    below a sweep folder."""
    path = Path(path)
    if (path / SUBMISSION_FILE).exists() or (path / "config.yaml").exists():
        return [path, *sorted(p.parent for p in path.glob("stages/*/config.yaml"))]
    found = {p.parent for p in path.rglob(SUBMISSION_FILE)} | {p.parent for p in path.rglob("config.yaml")}
    return sorted(found)


def queue_state(submission: Submission) -> tuple[str, str]:
    """SLURM's state of a submitted job in the common vocabulary; ("", "") when SLURM cannot say."""
    try:
        raw = job_of(submission).state
    except Exception:  # noqa: BLE001 - a status table must not die on one run
        return ("", "")
    word, _, rest = raw.partition(" ")
    if word == "NODE_FAIL" and requeued_by_slurm(submission.job_id):
        # the attempt died with its node, and SLURM requeues the job (JobRequeue): not over yet
        return (REQUEUED, "node failure; SLURM requeues the job")
    if word in STATES:
        return (word, rest.strip())  # e.g. CANCELLED by 0
    return SLURM_STATES.get(word, ("", ""))


def requeued_by_slurm(job_id: str) -> bool:
    """Whether the controller still holds the job and will requeue it (`Requeue=1`)."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return shown.returncode == 0 and "Requeue=1" in shown.stdout.split()


def last_error_line(paths: list[Path]) -> str:
    """The last line that names an exception (`ValueError: ...`), else the last non-empty line."""
    lines: list[str] = []
    for path in paths:
        if path.exists():
            lines += [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return (errors or lines or [""])[-1][:300]


def run_status(run_dir: Path) -> dict[str, Any]:
    """One row of `scaleyard status`: state (and reason), step of steps, last loss, headline eval
    metric, requeues."""
    run_dir = Path(run_dir)
    row = files_row(run_dir)
    submission = read_submission(run_dir)
    if submission is not None:
        row["cluster"] = submission.cluster
        stderr = [JobPaths(submission.folder, job_id=submission.job_id, task_id=0).stderr]
        if submission.cluster == "slurm":
            row["job_id"] = submission.job_id
            state, reason = queue_state(submission)
            if state:
                if state == FAILED and row["state"] == FAILED:
                    reason = row["reason"]  # the failing rank's own words
                row.update(state=state, reason=reason or (last_error_line(stderr) if state == FAILED else ""))
        else:  # submitit's local executor: the job id is the pid of the process that runs rank 0
            row["pid"] = int(submission.job_id)
            if not read_records(run_dir) and row["state"] == PENDING:
                if not pid_alive(int(submission.job_id)):
                    row.update(state=FAILED, reason=last_error_line(stderr) or "ended before the run started")
    fallbacks = run_dir / FALLBACKS
    if fallbacks.exists():  # checkpoints set aside as damaged (platform/checkpoint_integrity.py)
        row["fallbacks"] = [json.loads(line) for line in fallbacks.read_text().splitlines() if line.strip()]
    placement = sorted((run_dir / PLACEMENT).glob("rank*.json"))
    if placement:  # which node each rank runs on (written by every rank at each start)
        nodes: dict[str, list[int]] = {}
        for entry in (json.loads(path.read_text()) for path in placement):
            nodes.setdefault(entry["node"], []).append(entry["rank"])
        row["nodes"] = {node: sorted(ranks) for node, ranks in sorted(nodes.items())}
    attempts = run_dir / "attempts.jsonl"
    row["requeues"] = 0
    if attempts.exists():
        lines = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
        row["requeues"] = max((a["restart_count"] for a in lines), default=0)
        row["starts"] = len(lines)
    return row


def run_state(run_dir: Path) -> str:
    """The run's state for a launcher: "" when nothing ever started or queued it."""
    run_dir = Path(run_dir)
    if read_submission(run_dir) is None and not read_records(run_dir) and not (run_dir / "summary.json").exists():
        return ""
    return run_status(run_dir)["state"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Runs with state, step, loss, headline metric and swept values; `*` marks a sweep's best run;
    a failed run's reason ends its line."""
    swept = any(row.get("values") for row in rows)
    header = (f"  {'run':40s} {'job':>10s} {'state':>10s} {'step':>13s} {'loss':>10s} {'metric':>22s} "
              f"{'requeues':>8s}" + ("  values" if swept else ""))
    lines = [header]
    for row in rows:
        loss = f"{row['loss']:.4g}" if isinstance(row["loss"], float) else "-"
        step = "-" if row["step"] is None else str(row["step"]) + (f"/{row['steps']}" if row.get("steps") else "")
        metric = "-"
        if row.get("metric") and isinstance(row.get("metric_value"), int | float):
            metric = f"{row['metric'].removeprefix('eval.')}={row['metric_value']:.4g}"
        job = row["job_id"] or row.get("cluster", "local")
        line = (f"{'*' if row.get('best') else ' '} {row['run'][-40:]:40s} {job:>10s} {row['state'][:10]:>10s} "
                f"{step:>13s} {loss:>10s} {metric[-22:]:>22s} {row.get('requeues', 0):>8d}")
        if swept:
            line += "  " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in row.get("values", {}).items())
        if row.get("reason") and row["state"] in (FAILED, CANCELLED, TIMEOUT):
            line += f"  ({row['reason'][:120]})"
        if len(row.get("nodes", {})) > 1:
            line += "  [ranks " + " ".join(f"{n}:{','.join(map(str, r))}" for n, r in row["nodes"].items()) + "]"
        if row.get("fallbacks"):
            last, earlier = row["fallbacks"][-1], len(row["fallbacks"]) - 1
            line += (f"  [fell back: {last['checkpoint']} set aside, resumed from {last['resumed_from']}"
                     + (f"; {earlier} earlier]" if earlier else "]"))
        lines.append(line)
    if any(row.get("best") for row in rows):
        lines.append("* best run of its sweep")
    return "\n".join(lines)


def cancel(run_dir: Path) -> str:
    """Cancel a run: scancel for SLURM jobs; TERM to the live ranks of a local run (they checkpoint
    and stay stopped). Returns what was cancelled, "" when nothing runs."""
    run_dir = Path(run_dir)
    submission = read_submission(run_dir)
    if submission is not None and submission.cluster == "slurm":
        job_of(submission).cancel(check=False)
        return submission.job_id
    pids = [int(r["pid"]) for r in read_records(run_dir) if r["state"] == RUNNING and alive_here(r)]
    if not pids and submission is not None and pid_alive(int(submission.job_id)):
        pids = [int(submission.job_id)]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return f"pid {','.join(map(str, pids))}" if pids else ""


def log_files(run_dir: Path, rank: int) -> tuple[Path, ...]:
    """A submitted run's stdout/stderr as submitit keeps them (everything the rank printed);
    otherwise the rank's log in the run folder (`logs/rank<R>.log`, every run has one)."""
    run_dir = Path(run_dir)
    submission = read_submission(run_dir)
    if submission is not None:
        paths = JobPaths(submission.folder, job_id=submission.job_id, task_id=rank)
        if paths.stdout.exists() or paths.stderr.exists():
            return (paths.stdout, paths.stderr)
    own = log_file(run_dir, rank)
    if own.exists():
        return (own,)
    have = sorted(p.name for p in (run_dir / "logs").glob("rank*.log")) if (run_dir / "logs").exists() else []
    if have:
        raise FileNotFoundError(f"{run_dir} has no log of rank {rank}; logs: {', '.join(have)}")
    raise FileNotFoundError(f"{run_dir} has no logs (logs/rank<R>.log): it is not a run folder, or no rank "
                            "has started yet")


def ended(run_dir: Path) -> bool:
    return run_status(run_dir)["state"] not in (PENDING, RUNNING, REQUEUED)


def follow(paths: tuple[Path, ...], done: Any, poll_s: float = 0.5) -> Iterator[str]:
    """Lines appended to the files until `done()` says the job ended (then the rest)."""
    offsets = dict.fromkeys(paths, 0)
    while True:
        finished = done()
        for path in paths:
            if path.exists():
                with open(path, errors="replace") as handle:
                    handle.seek(offsets[path])
                    chunk = handle.read()
                    offsets[path] = handle.tell()
                yield from chunk.splitlines()
        if finished:
            return
        time.sleep(poll_s)

