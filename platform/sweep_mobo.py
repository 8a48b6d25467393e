"""`strategy: mobo` sweeps: rounds of runs proposed by multi-objective BO (platform/mobo_acquisition.py)
until the budget of runs is spent. Each round is one job array through the `Launcher`; the driver
(`scaleyard sweep SPEC`) waits for the round, reads the objectives from the runs' summary.json,
fits the model and proposes the next round.

Resumable: `manifest.json` records every proposal (round, values, unit-cube point, attempts, state,
objectives) BEFORE it is submitted, so rerunning the same command after a crash or a kill picks up
where it stopped: finished runs are read, not rerun; queued or running ones are waited for; a
proposal written but never submitted is submitted; nothing is proposed twice, because a round is
proposed only when the one before has ended, from the recorded results and the seed (the same
results and seed give the same proposals). A run that ends without a summary (failed, cancelled,
timed out, killed) is run again `retries` times (its folder kept as NAME.attempt<k>), then recorded
as failed: excluded from the front, and seen by the model at the worst value of each objective
(`failed: worst`, so the search steers away) or not at all (`failed: exclude`). It counts toward the
budget, so a sweep always ends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scaleyard.platform.config import ConfigError
from scaleyard.platform.launcher import Launcher, RunRequest
from scaleyard.platform.mobo_spec import MoboSpec
from scaleyard.platform.run_record import COMPLETED, local_state
from scaleyard.platform.sweep_mobo_report import FAILED, front_and_volume, read_objectives
from scaleyard.platform.sweep_spec import SweepSpec, render

MANIFEST, SPEC_FILE = "manifest.json", "spec.yaml"
QUEUED = ("PENDING", "RUNNING", "REQUEUED")  # platform/sweep.py QUEUED: still going, wait for it
PROPOSED, SUBMITTED = "proposed", "submitted"
DONE = "completed"


class MoboDriver:
    def __init__(self, spec: SweepSpec, sweep_dir: Path, launcher: Launcher,
                 on_wait: Callable[[], None] | None = None, say: Callable[[str], None] | None = None,
                 poll_s: float | None = None):
        self.spec, self.sweep_dir, self.launcher, self.on_wait = spec, Path(sweep_dir), launcher, on_wait
        self.mobo = MoboSpec.from_dict(spec.mobo)
        self.say = say or (lambda line: print(line, flush=True))
        self.poll_s = poll_s or (1.0 if launcher.runs_here else 5.0)
        self.manifest: dict[str, Any] = {}
        self.submitted: list[str] = []
        self._prepared: dict[str, Any] = {}  # run name -> Prepared, checked when proposed (prepare is slow)

    # --- the manifest --------------------------------------------------------------------------
    def _load(self) -> None:
        from scaleyard.platform.sweep import _same_spec

        path = self.sweep_dir / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if not _same_spec(manifest["spec"], self.spec):
                raise ConfigError(f"{self.sweep_dir} holds a different sweep ({MANIFEST}); use another folder (--dir)")
            self.manifest = manifest
        else:
            self.manifest = {"spec": self.spec.as_dict(), "ref_point": None, "runs": []}

    def _save(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        for name, text in ((MANIFEST, json.dumps(self.manifest, indent=1)), (SPEC_FILE, self.spec.dump())):
            tmp = self.sweep_dir / (name + ".tmp")
            tmp.write_text(text)
            tmp.rename(self.sweep_dir / name)

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.manifest["runs"]

    # --- checks before anything is written -----------------------------------------------------
    def _prepare(self, overrides: list[str]):
        from scaleyard.platform.launch import prepare

        return prepare(self.spec.job, overrides, self.spec.preset, self.launcher.world_size,
                       self.launcher.gpu_memory_gb, self.launcher.runs_here)

    def probe(self) -> None:
        """The space's two corners make valid configs (unknown keys, wrong types fail here, before
        anything is written)."""
        for corner in (0.0, 1.0):
            values = self.mobo.decode([corner] * len(self.mobo.space))
            self._prepare([*self.spec.base, *_overrides(values), f"run.dir={self.sweep_dir.absolute() / 'probe'}"])

    # --- one pass ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._load()
        skipped = [r["name"] for r in self.runs if r["state"] == DONE]
        if not self.runs:
            self.probe()
        self._save()
        while True:
            to_submit, waiting = self._settle()
            if to_submit:
                self._submit(to_submit)
                continue
            if waiting:
                if self.on_wait is not None:
                    self.on_wait()
                time.sleep(self.poll_s)
                continue
            if self.runs and not self._round_summary_said():
                self._say_round()
            if len(self.runs) >= self.mobo.budget:
                break
            self._propose()
        front, volume = front_and_volume(self.sweep_dir, self.manifest)
        return {"runs": len(self.runs), "submitted": self.submitted, "skipped": skipped,
                "rounds": self._round() + 1, "front": [r["name"] for r in front], "hypervolume": volume}

    def _round(self) -> int:
        return max((r["round"] for r in self.runs), default=-1)

    def _settle(self) -> tuple[list[tuple[dict[str, Any], bool]], list[dict[str, Any]]]:
        """Bring every open entry up to date: (to submit with whether that is a new attempt, still
        queued or running)."""
        to_submit, waiting, changed = [], [], False
        for entry in self.runs:
            if entry["state"] in (DONE, FAILED):
                continue
            run_dir = self.sweep_dir / entry["name"]
            state = self.launcher.state(run_dir) if entry["state"] == SUBMITTED else ""
            if state == COMPLETED and (run_dir / "summary.json").exists():
                entry.update(state=DONE, objectives=self._objectives(run_dir))
                changed = True
            elif state in QUEUED:
                waiting.append(entry)
            elif state == "":  # proposed, or submitted but the launcher never got it (a crash in between)
                to_submit.append((entry, entry["state"] == PROPOSED))
            elif entry["attempts"] <= self.mobo.retries:
                _set_aside(run_dir, entry["attempts"])
                self.say(f"mobo: {entry['name']} ended {state} ({local_state(run_dir)[1] or 'no reason'}); "
                         f"running it again (attempt {entry['attempts'] + 1} of {self.mobo.retries + 1})")
                to_submit.append((entry, True))
            else:
                entry.update(state=FAILED, reason=f"{state}: {local_state(run_dir)[1]}".strip(": "))
                self.say(f"mobo: {entry['name']} failed after {entry['attempts']} attempt(s), recorded as failed "
                         f"({entry['reason']})")
                changed = True
        if changed:
            self._save()
        return to_submit, waiting

    def _objectives(self, run_dir: Path) -> dict[str, float]:
        found = read_objectives(run_dir, self.mobo.objectives) or {}
        missing = [name for name, value in found.items() if value is None]
        if missing:
            summary = json.loads((run_dir / "summary.json").read_text())
            have = [k for k, v in summary.items() if isinstance(v, int | float)]
            have += [f"eval.{k}" for k in summary.get("eval") or {}]
            raise ConfigError(f"mobo objective(s) {missing} are not numbers in {run_dir / 'summary.json'}; the runs "
                              f"report: {', '.join(have)}. Fix mobo.objectives and start a new sweep folder (--dir)")
        return found

    def _submit(self, todo: list[tuple[dict[str, Any], bool]]) -> None:
        from scaleyard.platform.launch import write_config

        requests, entries = [], [entry for entry, _ in todo]
        for entry, new_attempt in todo:
            prepared = self._prepared.pop(entry["name"], None) or self._prepare(entry["overrides"])
            write_config(prepared)
            requests.append(RunRequest(self.spec.job, prepared.preset, prepared.overrides, str(prepared.run_dir)))
            entry["attempts"] += int(new_attempt)  # (a submission the launcher never got is not an attempt)
            entry["state"] = SUBMITTED
        self._save()  # recorded before it is queued: a crash now resubmits, never proposes anew
        self.launcher.submit_array(requests, f"sy-mobo-{self.spec.job}", self.sweep_dir / "submitit",
                                   self.spec.concurrency, self.on_wait)
        self.submitted += [e["name"] for e in entries]
        self.say(f"mobo round {self._round()}: submitted {', '.join(e['name'] for e in entries)} as one array")

    # --- proposing -----------------------------------------------------------------------------
    def _data(self) -> tuple[list[list[float]], list[list[float]]]:
        done = [r for r in self.runs if r["state"] == DONE]
        x = [r["x"] for r in done]
        y = [[o.to_max(r["objectives"][o.name]) for o in self.mobo.objectives] for r in done]
        failed = [r for r in self.runs if r["state"] == FAILED]
        if failed and y and self.mobo.failed == "worst":
            worst = [min(column) for column in zip(*y)]
            x += [r["x"] for r in failed]
            y += [worst for _ in failed]
        return x, y

    def _reference(self) -> list[float] | None:
        """The hypervolume's reference point, in the model's space, fixed once the first results are
        in (so hypervolumes of later rounds compare): an objective's `ref`, else its worst value in
        the first results less a tenth of their range."""
        if self.manifest.get("ref_point"):
            return self.manifest["ref_point"]
        done = [r for r in self.runs if r["state"] == DONE]
        if not done:
            return None
        ref = []
        for o in self.mobo.objectives:
            values = [o.to_max(r["objectives"][o.name]) for r in done]
            span = max(values) - min(values) or abs(min(values)) or 1.0
            ref.append(o.to_max(o.ref) if o.ref is not None else min(values) - 0.1 * span)
        self.manifest["ref_point"] = ref
        return ref

    def _propose(self) -> None:
        import torch

        from scaleyard.platform.mobo_acquisition import Effort, propose

        rnd = self._round() + 1
        n = min(self.mobo.initial if rnd == 0 else self.mobo.batch, self.mobo.budget - len(self.runs))
        acquisition = "random" if rnd == 0 else self.mobo.acquisition
        x, y = self._data()
        ref = self._reference()
        d, m = len(self.mobo.space), len(self.mobo.objectives)
        start = time.perf_counter()
        tensor = torch.tensor
        points = propose(tensor(x, dtype=torch.double).view(-1, d), tensor(y, dtype=torch.double).view(-1, m),
                         tensor(ref or [0.0] * m, dtype=torch.double), n,
                         acquisition if ref is not None else "random", self.mobo.horizon,
                         Effort(**self.mobo.effort), seed=1000 * self.mobo.seed + rnd,
                         snap=lambda u: torch.tensor(self.mobo.snap(u.tolist()), dtype=torch.double))
        seconds = time.perf_counter() - start
        for point in points.tolist():
            values = self.mobo.decode(point)
            name = f"r{rnd:02d}-{len(self.runs):03d}"
            overrides = [*self.spec.base, *_overrides(values), f"run.dir={self.sweep_dir.absolute() / name}"]
            entry = {"name": name, "round": rnd, "values": values, "x": self.mobo.encode(values),
                     "overrides": overrides, "attempts": 0, "state": PROPOSED, "objectives": None,
                     "acquisition": acquisition}
            try:
                self._prepared[name] = self._prepare(overrides)
            except ConfigError as err:  # a combination the job refuses: a failed run the model learns from
                entry.update(state=FAILED, reason=f"config: {err}")
            self.runs.append(entry)
        self._save()
        self.say(f"mobo round {rnd}: {acquisition} proposed {n} run(s) in {seconds:.1f}s: "
                 + "; ".join(f"{r['name']} " + " ".join(f"{k}={render(v)}" for k, v in r["values"].items())
                             for r in self.runs[-n:]))

    def _round_summary_said(self) -> bool:
        return self.manifest.get("said_round") == self._round()

    def _say_round(self) -> None:
        self._reference()
        front, volume = front_and_volume(self.sweep_dir, self.manifest)
        mine = [r for r in self.runs if r["round"] == self._round()]
        self.say(f"mobo round {self._round()} ended: {sum(r['state'] == DONE for r in mine)} completed, "
                 f"{sum(r['state'] == FAILED for r in mine)} failed; {len(self.runs)}/{self.mobo.budget} runs; "
                 + (f"hypervolume {volume:.6g}; " if volume is not None else "")
                 + f"Pareto front: {', '.join(r['name'] for r in front) or '-'}")
        self.manifest["said_round"] = self._round()
        self._save()


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={render(v)}" for k, v in values.items()]


def _set_aside(run_dir: Path, attempt: int) -> None:
    """Keep a failed attempt's folder (its logs say why) and let the retry start anew: its stale
    FAILED records would otherwise read as the retry's state until the retry writes its own."""
    if run_dir.exists():
        target = run_dir.with_name(f"{run_dir.name}.attempt{attempt}")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        run_dir.rename(target)


def launch_mobo(spec: SweepSpec, sweep_dir: Path, launcher: Launcher,
                on_wait: Callable[[], None] | None = None, say: Callable[[str], None] | None = None,
                poll_s: float | None = None) -> dict[str, Any]:
    """Run (or resume) a mobo sweep to its budget; returns what `sweep.launch` returns, plus rounds,
    the front and the hypervolume."""
    return MoboDriver(spec, sweep_dir, launcher, on_wait, say, poll_s).run()
