"""Sweeps: a spec (platform/sweep_spec.py) expanded into runs, every run checked, then handed to a
`Launcher` as one array; recorded in `manifest.json` and `spec.yaml` in the sweep folder, resumable
(finished and queued runs are skipped). Also what `status` and `sweep --wait` add for sweeps: the
swept values of each run, the best run, and progress with an ETA."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleyard.platform.config import ConfigError
from scaleyard.platform.launcher import Launcher, RunRequest
from scaleyard.platform.run_record import (
    COMPLETED,
    ENDED,
    FAILED,
    PENDING,
    REQUEUED,
    RUNNING,
    files_row,
    metric_of,
)  # fmt: skip
from scaleyard.platform.sweep_spec import SweepSpec, render

if TYPE_CHECKING:  # launch imports torch: `status` reads sweeps without it
    from scaleyard.platform.launch import Prepared

MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"
QUEUED = (PENDING, RUNNING, REQUEUED)  # a run in one of these is not submitted again
SWEEPS_DIR = Path("runs") / "sweeps"


@dataclass
class PlannedRun:
    name: str
    overrides: list[str]
    values: dict[str, Any]  # the swept values of this run
    prepared: Prepared


def resolve_target(target: str, overrides: list[str], preset: str | None, concurrency: int | None,
                   folder: str | None) -> tuple[SweepSpec, Path]:
    """`scaleyard sweep SPEC.yaml` or `scaleyard sweep JOB KEY=A,B ...`: the spec and the sweep folder.
    A spec inside a sweep folder (its spec.yaml) resumes that sweep."""
    path = Path(target)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        extra = [f"{name} {value}" for name, value in (("overrides", " ".join(overrides)), ("--preset", preset),
                                                       ("--concurrency", concurrency)) if value]
        if extra:
            raise ConfigError(f"sweep spec {path} takes no {', '.join(extra)}: put them in the spec ('base', "
                              "'preset', 'concurrency'), or sweep from the command line: scaleyard sweep JOB KEY=A,B")
        spec = SweepSpec.load(path)
        default = path.parent if (path.parent / MANIFEST).exists() else SWEEPS_DIR / path.stem
    else:
        spec = SweepSpec.from_overrides(target, preset, overrides, concurrency)
        default = SWEEPS_DIR / target / time.strftime("%Y%m%d-%H%M%S")
    return spec, Path(folder) if folder else default


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", render(value)).strip("-")


def expand(spec: SweepSpec, sweep_dir: Path, world_size: int = 1, gpu_memory_gb: float | None = None,
           runs_here: bool = True) -> list[PlannedRun]:
    """Every run of the sweep, validated (config, steps from budgets) before anything is queued."""
    from scaleyard.platform.launch import prepare

    points: list[tuple[str, list[str], dict[str, Any]]] = []
    if spec.grid:
        keys = sorted(spec.grid)  # sorted: folder names stay those of sweeps started before
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            name = "_".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in zip(keys, values))
            points.append((name, [f"{k}={render(v)}" for k, v in zip(keys, values)], dict(zip(keys, values))))
    else:
        key = spec.isoflop["key"]
        for value, budget in itertools.product(spec.isoflop["values"], spec.isoflop["budgets"]):
            probe = prepare(spec.job, [*spec.base, f"{key}={render(value)}"], spec.preset, world_size,
                            gpu_memory_gb, runs_here)
            per_step = probe.job.flops_per_sample(probe.cfg) * probe.cfg.train.batch_size
            if per_step <= 0:
                raise ConfigError(f"job {spec.job} reports no flops_per_sample: an IsoFLOP ladder needs it")
            steps = math.floor(budget / per_step)
            if steps < 1:
                raise ConfigError(f"budget {budget:.3g} FLOPs is too small for one step of {key}={value} "
                                  f"({per_step:.3g} FLOPs per step at train.batch_size={probe.cfg.train.batch_size})")
            points.append((f"{_slug(value)}_C{budget:.2e}", [f"{key}={render(value)}", f"train.steps={steps}"],
                           {key: value, "budget": budget}))
    names = [name for name, _, _ in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"sweep runs would share the folder name(s) {clashes}: two axes end in the same word or "
                          "two values differ only in punctuation; rename the values")
    runs = []
    for name, overrides, values in points:
        run_overrides = [*spec.base, *overrides, f"run.dir={sweep_dir.absolute() / name}"]
        prepared = prepare(spec.job, run_overrides, spec.preset, world_size, gpu_memory_gb, runs_here)
        runs.append(PlannedRun(name, run_overrides, values, prepared))
    return runs


def _same_spec(recorded: dict[str, Any], spec: SweepSpec) -> bool:
    try:  # normalised the same way (manifests written before a field existed get its default)
        return SweepSpec.from_dict(recorded).as_dict() == spec.as_dict()
    except ConfigError:
        return False


def launch(spec: SweepSpec, sweep_dir: Path, launcher: Launcher,
           on_wait: Callable[[], None] | None = None) -> dict[str, Any]:
    """Check every run, record the sweep, and hand the runs that are neither finished nor queued to
    the launcher as one array. A `strategy: mobo` sweep proposes its runs round by round and returns
    when its budget is spent (platform/sweep_mobo.py)."""
    if spec.strategy == "mobo":
        from scaleyard.platform.sweep_mobo import launch_mobo

        return launch_mobo(spec, sweep_dir, launcher, on_wait)
    from scaleyard.platform.launch import check_run_dir, write_config

    manifest_file = sweep_dir / MANIFEST
    if manifest_file.exists() and not _same_spec(json.loads(manifest_file.read_text())["spec"], spec):
        raise ConfigError(f"{sweep_dir} holds a different sweep ({MANIFEST}); use another folder (--dir)")
    runs = expand(spec, sweep_dir, launcher.world_size, launcher.gpu_memory_gb, launcher.runs_here)
    pending, skipped = [], []
    for run in runs:
        if check_run_dir(run.prepared) == "finished" or launcher.state(run.prepared.run_dir) in QUEUED:
            skipped.append(run.name)
        else:
            pending.append(run)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"spec": spec.as_dict(),
                "runs": [{"name": r.name, "overrides": r.overrides, "values": r.values} for r in runs]}
    _write_atomic(manifest_file, json.dumps(manifest, indent=1))
    _write_atomic(sweep_dir / SPEC_FILE, spec.dump())  # `scaleyard sweep <dir>/spec.yaml` resumes it
    for run in pending:
        write_config(run.prepared)
    requests = [RunRequest(spec.job, run.prepared.preset, run.prepared.overrides, str(run.prepared.run_dir))
                for run in pending]
    if requests:
        launcher.submit_array(requests, f"sy-sweep-{spec.job}", sweep_dir / "submitit", spec.concurrency, on_wait)
    return {"runs": len(runs), "submitted": [r.name for r in pending], "skipped": skipped}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Status rows of sweep runs get their swept values, the spec's metric (if it names one) and
    `best` on the best finished run of each sweep (lowest final_loss, or the spec's metric and
    direction)."""
    manifests: dict[Path, dict[str, Any] | None] = {}
    for row in rows:
        row.setdefault("values", {})
        row.setdefault("best", False)
        folder = Path(row["run"]).parent
        if folder not in manifests:
            manifests[folder] = read_manifest(folder)
        manifest = manifests[folder]
        if manifest is None:
            continue
        entry = next((r for r in manifest["runs"] if r["name"] == Path(row["run"]).name), None)
        if entry is not None:
            row["values"] = entry.get("values") or _differing(manifest, entry)
        metric = manifest["spec"].get("metric")
        if metric:
            row.update(metric=metric, metric_value=metric_of(Path(row["run"]), metric))
    for folder, manifest in manifests.items():
        if manifest is None:
            continue
        if manifest["spec"].get("strategy") == "mobo":  # a mobo sweep's best runs: its Pareto front
            from scaleyard.platform.sweep_mobo_report import rows as mobo_rows

            front = {r["name"] for r in mobo_rows(folder, manifest) if r["pareto"]}
            for row in rows:
                if Path(row["run"]).parent == folder and Path(row["run"]).name in front:
                    row["best"] = True
            continue
        metric = manifest["spec"].get("metric") or "final_loss"
        sign = -1 if manifest["spec"].get("direction", "min") == "max" else 1
        scored = [(sign * value, row) for row in rows if Path(row["run"]).parent == folder and row["state"] == COMPLETED
                  and (value := metric_of(Path(row["run"]), metric)) is not None]
        if scored:
            min(scored, key=lambda pair: pair[0])[1]["best"] = True
    return rows


def _differing(manifest: dict[str, Any], entry: dict[str, Any]) -> dict[str, str]:
    """Swept values of manifests written before they were recorded: the overrides that differ."""
    common = set.intersection(*(set(r["overrides"]) for r in manifest["runs"]))
    return dict(o.split("=", 1) for o in entry["overrides"] if o not in common and not o.startswith("run.dir="))


class SweepProgress:
    """`sweep --wait`: one line when the counts change (or every `every_s`), with an ETA from the
    rate at which the sweep's steps have been done since waiting began."""

    def __init__(self, sweep_dir: Path, launcher: Launcher, say: Callable[[str], None] | None = None,
                 every_s: float = 30.0):
        self.sweep_dir, self.launcher, self.every_s = Path(sweep_dir), launcher, every_s
        self.say = say or (lambda line: print(line, flush=True))
        self.started = time.monotonic()
        self.first_fraction: float | None = None
        self.last: tuple[str, float] = ("", 0.0)

    def states(self) -> list[tuple[str, float]]:
        """(state, share of its steps done) of every run of the sweep."""
        manifest = read_manifest(self.sweep_dir)
        out = []
        for entry in manifest["runs"] if manifest else []:
            run_dir = self.sweep_dir / entry["name"]
            state = self.launcher.state(run_dir) or PENDING
            row = files_row(run_dir)
            done = 1.0 if state in ENDED else min(1.0, (row["step"] or 0) / row["steps"]) if row["steps"] else 0.0
            out.append((state, done))
        return out

    def tick(self) -> bool:
        """Say where the sweep stands if due; True once every run has ended."""
        states = self.states()
        counts = {s: sum(1 for state, _ in states if state == s) for s in (COMPLETED, RUNNING, FAILED)}
        others = len(states) - sum(counts.values())
        fraction = sum(done for _, done in states) / max(len(states), 1)
        if self.first_fraction is None:
            self.first_fraction = fraction
        elapsed = time.monotonic() - self.started
        eta = "-"
        if fraction >= 1:
            eta = "0s"
        elif fraction > self.first_fraction:
            eta = _duration(elapsed * (1 - fraction) / (fraction - self.first_fraction))
        summary = (f"{counts[COMPLETED]}/{len(states)} completed, {counts[RUNNING]} running, {counts[FAILED]} failed, "
                   f"{others} pending or stopped")
        if summary != self.last[0] or elapsed - self.last[1] >= self.every_s:
            self.say(f"sweep {self.sweep_dir}: {summary}; {fraction:.0%} of steps done, ETA {eta}")
            self.last = (summary, elapsed)
        return bool(states) and all(state in ENDED for state, _ in states)

    def wait(self, poll_s: float | None = None) -> bool:
        """Until every run has ended; True when all completed. Polls a cluster's queue every 5 s,
        local runs (files only) every second."""
        while not self.tick():
            time.sleep(poll_s or (1.0 if self.launcher.runs_here else 5.0))
        return all(state == COMPLETED for state, _ in self.states())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
