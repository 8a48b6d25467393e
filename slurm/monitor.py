"""`scaleyard status | cancel | logs`: what runs are doing, from their run folders."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from scaleyard.slurm.launch import SUBMISSION_FILE, job_of, read_submission


def run_dirs(path: Path) -> list[Path]:
    """A run folder, or every run folder below a sweep folder."""
    path = Path(path)
    if (path / SUBMISSION_FILE).exists() or (path / "config.yaml").exists():
        return [path]
    found = {p.parent for p in path.rglob(SUBMISSION_FILE)} | {p.parent for p in path.rglob("config.yaml")}
    return sorted(found)


def run_status(run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"run": str(run_dir), "job_id": "", "state": "", "step": None, "loss": None,
                           "requeues": 0}
    submission = read_submission(run_dir)
    if submission is not None:
        row["job_id"] = submission.job_id
        try:
            row["state"] = job_of(submission).state
        except Exception as err:  # noqa: BLE001 - a status table must not die on one run
            row["state"] = f"UNKNOWN ({type(err).__name__})"
        if submission.cluster == "local" and row["state"].startswith("NO PROCESS"):
            # submitit only knows a local job's state in the process that started it; from here,
            # the job id is the pid of its runner
            row["state"] = "RUNNING" if _alive(int(submission.job_id)) else "FAILED"
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(step=summary.get("step"), loss=summary.get("final_loss"))
        row["state"] = row["state"] or "FINISHED"
    elif (run_dir / "progress.json").exists():
        progress = json.loads((run_dir / "progress.json").read_text())
        row.update(step=progress["step"], loss=progress["loss"])
    attempts = run_dir / "attempts.jsonl"
    if attempts.exists():
        lines = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
        row["requeues"] = max((a["restart_count"] for a in lines), default=0)
        row["starts"] = len(lines)
    return row


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'run':50s} {'job':>10s} {'state':>12s} {'step':>8s} {'loss':>10s} {'requeues':>8s}"
    lines = [header]
    for row in rows:
        loss = f"{row['loss']:.4g}" if isinstance(row["loss"], float) else "-"
        step = str(row["step"]) if row["step"] is not None else "-"
        lines.append(f"{row['run'][-50:]:50s} {row['job_id']:>10s} {row['state'][:12]:>12s} {step:>8s} {loss:>10s} "
                     f"{row['requeues']:>8d}")
    return "\n".join(lines)


def cancel(run_dir: Path) -> str:
    submission = read_submission(run_dir)
    if submission is None:
        raise FileNotFoundError(f"{run_dir} has no {SUBMISSION_FILE}: it was not submitted with `scaleyard submit`")
    job_of(submission).cancel(check=False)
    return submission.job_id


def log_files(run_dir: Path, rank: int) -> tuple[Path, Path]:
    submission = read_submission(run_dir)
    if submission is None:
        raise FileNotFoundError(f"{run_dir} has no {SUBMISSION_FILE}: it was not submitted with `scaleyard submit`")
    paths = JobPaths(submission.folder, job_id=submission.job_id, task_id=rank)
    return paths.stdout, paths.stderr


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
