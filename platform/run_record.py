"""What a run did, in SLURM's words, from the files in its run folder.

Every rank of every run (`scaleyard run`, `--nproc N`, submitted jobs) keeps, under `run_dir/logs/`:
- `rank<R>.log`: its log lines (appended across restarts; tracebacks of failures included);
- `rank<R>.json`: its record: RUNNING with pid and host while it runs, then how it ended:
  COMPLETED, FAILED (exception type and message), PREEMPTED (checkpointed on a warning signal)
  or CANCELLED (TERM or Ctrl-C: checkpointed, stays stopped).
`scaleyard status` reads them for runs no queue knows about (local runs) and for the reason of a
failure; SLURM's own state wins for submitted runs. Only the standard library here: status must
answer fast and print nothing but its table or JSON.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

# SLURM's vocabulary, used for every run wherever it ran.
PENDING, RUNNING, COMPLETED, FAILED = "PENDING", "RUNNING", "COMPLETED", "FAILED"
CANCELLED, PREEMPTED, REQUEUED, TIMEOUT = "CANCELLED", "PREEMPTED", "REQUEUED", "TIMEOUT"
STATES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, PREEMPTED, REQUEUED, TIMEOUT)
ENDED = (COMPLETED, FAILED, CANCELLED, TIMEOUT)
LOG_DIR = "logs"
# checkpoints set aside as damaged, one JSON line each (written by platform/checkpoint_integrity.py)
FALLBACKS = "fallbacks.jsonl"


def log_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOG_DIR / f"rank{rank}.log"


def record_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOG_DIR / f"rank{rank}.json"


class RankRecord:
    """Context manager around one rank of a run: a log file handler on the root logger (stdout
    keeps its own handler) and the rank's record, RUNNING on entry and the outcome on exit.
    `stop` is the exception type of a checkpointed stop on a signal (the Trainer's `Preempted`);
    exceptions always propagate."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, stop: type[BaseException]):
        self.run_dir, self.rank, self.world_size, self.stop = Path(run_dir), rank, world_size, stop
        self.handler: logging.FileHandler | None = None
        self.lowered: logging.Logger | None = None
        self.record: dict[str, Any] = {}

    def __enter__(self) -> RankRecord:
        (self.run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(log_file(self.run_dir, self.rank))
        self.handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {self.rank}] %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(self.handler)
        platform_log = logging.getLogger("scaleyard")
        if platform_log.getEffectiveLevel() > logging.INFO:  # used as a library with logging unconfigured
            platform_log.setLevel(logging.INFO)
            self.lowered = platform_log
        self.record = {"rank": self.rank, "world_size": self.world_size, "state": RUNNING, "pid": os.getpid(),
                       "host": socket.gethostname(), "started": time.time()}
        _write(record_file(self.run_dir, self.rank), self.record)
        self.handler.handle(logging.LogRecord(  # to the file only: a console needs no separator line
            "scaleyard", logging.INFO, __file__, 0, "rank %d of %d started (pid %d on %s)",
            (self.rank, self.world_size, os.getpid(), self.record["host"]), None))
        return self

    def __exit__(self, kind, error, tb) -> None:
        ended = {"ended": time.time()}
        if error is None:
            ended["state"] = COMPLETED
        elif isinstance(error, self.stop):
            signum = getattr(error, "signum", None)
            ended["state"] = CANCELLED if signum == signal.SIGTERM else PREEMPTED
            ended["reason"] = str(error)
        elif isinstance(error, KeyboardInterrupt):
            ended.update(state=CANCELLED, reason="interrupted (Ctrl-C)")
        else:
            message = " ".join(str(error).split())  # one line for the status table
            ended.update(state=FAILED, error=type(error).__name__, message=str(error),
                         reason=f"{type(error).__name__}: {message}" if message else type(error).__name__)
            if self.handler is not None:  # the traceback goes to the log file only: stderr shows it already
                self.handler.handle(logging.LogRecord("scaleyard", logging.ERROR, __file__, 0, "run failed",
                                                      None, (kind, error, tb)))
        _write(record_file(self.run_dir, self.rank), {**self.record, **ended})
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
        if self.lowered is not None:
            self.lowered.setLevel(logging.NOTSET)


def _write(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.rename(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the latest start: the ranks below rank 0's world size (a resume on fewer
    ranks leaves older rank files behind)."""
    first = _read_json(record_file(run_dir, 0))
    if first is None:
        return []
    records = [first]
    for rank in range(1, int(first.get("world_size", 1))):
        record = _read_json(record_file(run_dir, rank))
        if record is not None and record.get("started", 0) >= first["started"] - 60:
            records.append(record)
    return records


def alive_here(record: dict[str, Any]) -> bool | None:
    """Whether the record's process still runs; None when it ran on another host."""
    if record.get("host") != socket.gethostname():
        return None
    return pid_alive(int(record["pid"]))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_state(run_dir: Path) -> tuple[str, str]:
    """(state, reason) from the rank records alone; ("", "") when no rank has started."""
    records = read_records(Path(run_dir))
    if not records:
        return ("", "")
    failed = sorted((r for r in records if r["state"] == FAILED), key=lambda r: r.get("ended", 0))
    if failed:
        return (FAILED, f"rank {failed[0]['rank']}: {failed[0].get('reason', '')}")
    running = [r for r in records if r["state"] == RUNNING]
    vanished = [r for r in running if alive_here(r) is False]
    if vanished:
        return (FAILED, f"rank {vanished[0]['rank']} (pid {vanished[0]['pid']}) ended without a record: "
                        "killed (SIGKILL, out of memory?)")
    if running:
        return (RUNNING, "")
    for state in (CANCELLED, PREEMPTED):
        stopped = [r for r in records if r["state"] == state]
        if stopped:
            return (state, stopped[0].get("reason", ""))
    return (COMPLETED, "")


def files_row(run_dir: Path) -> dict[str, Any]:
    """What the run folder says about progress: step, target steps, last loss, headline eval
    metric (the first one the job reports), and the state of a run that no queue knows."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run": str(run_dir), "job_id": "", "cluster": "local", "state": "", "reason": "",
                           "step": None, "steps": None, "loss": None, "metric": None, "metric_value": None}
    row["steps"] = _target_steps(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    progress = _read_json(run_dir / "progress.json")
    if summary is not None:
        row.update(step=summary.get("step"), loss=summary.get("final_loss"))
        evals = summary.get("eval") or {}
        if evals:
            name = next(iter(evals))
            row.update(metric=f"eval.{name}", metric_value=evals[name])
    elif progress is not None:
        row.update(step=progress.get("step"), loss=progress.get("loss"))
    state, reason = local_state(run_dir)
    if not state:
        state = COMPLETED if summary is not None else PENDING
    row.update(state=state, reason=reason)
    return row


def metric_of(run_dir: Path, name: str) -> float | None:
    """A named number of a finished run: `final_loss`, or an eval metric as `eval.NAME` or `NAME`."""
    summary = _read_json(Path(run_dir) / "summary.json") or {}
    if name in ("final_loss", "loss"):
        return summary.get("final_loss")
    value = (summary.get("eval") or {}).get(name.removeprefix("eval."))
    return value if isinstance(value, int | float) else None


def _target_steps(config: Path) -> int | None:
    """train.steps from config.yaml, read without OmegaConf (status stays light)."""
    try:
        import yaml

        steps = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("steps")
        return int(steps) if steps is not None else None
    except (OSError, ValueError, AttributeError):
        return None
