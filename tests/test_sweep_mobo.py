"""`strategy: mobo` sweeps: spec checks before anything is queued, the search space's unit-cube map,
exact hypervolume, the acquisitions (bounds and types, the non-myopic values' reductions and the
fantasy conditioning against BoTorch's), the round-by-round driver through a Launcher (the front
improves, failures are bounded, a crash resumes to the same proposals without duplicates), and a
real sweep of the classify job killed mid-way and resumed by the same command."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import scaleyard


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny GP matrices: a second thread only contends with the other tests sharing the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def botorch_python_path(monkeypatch):
    """BoTorch builds a fused C++ kernel for qLogNEHVI on its first use in a process (torch
    cpp_extension + ninja: 47 s on 2 cores, measured with cProfile; rebuilt for every new venv
    path, so in every CI run: this one test took 60-89 s in full runs and 2.5 s alone). These tests
    check the driver and the proposals, not that kernel: they take BoTorch's pure-Python path. The
    slow-tier real sweep and users' sweeps build and use the kernel."""
    from botorch.acquisition.multi_objective import logei

    monkeypatch.setattr(logei, "_load_attempted", True)
    monkeypatch.setattr(logei, "_C", None)


SPACE = {"optim.lr": {"low": 0.01, "high": 1.0}, "model.width": {"low": 1, "high": 8, "type": "int"}}
OBJECTIVES = {"final_loss": "min", "eval.f2": "min"}


def mobo_spec(classify_args=(), **mobo):
    from scaleyard.platform.sweep_spec import SweepSpec

    body = {"space": SPACE, "objectives": OBJECTIVES, "budget": 6, "batch": 2, "initial": 2,
            "acquisition": "qlognehvi", "effort": {"restarts": 2, "raw_samples": 32, "maxiter": 15, "mc_samples": 16},
            **mobo}
    base = [a for a in classify_args if a.partition("=")[0] not in body["space"]]
    return SweepSpec.from_dict({"job": "classify", "preset": "tiny", "base": base, "strategy": "mobo", "mobo": body})


# --- spec checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("mobo,expected", [
    ({"objectives": {"final_loss": "min", "gpu_hours": "min"}},
     "mobo.objectives.gpu_hours: 'gpu_hours' is not a number runs report"),
    ({"space": {"optim.lr": {"low": 0.1, "high": 0.1}}}, "mobo.space.optim.lr is an empty range"),
    ({"space": {"optim.lr": {"low": 0, "high": 1, "log": True}}}, "a log scale needs low > 0"),
    ({"space": {"model.width": {"low": 1, "high": 8.5, "type": "int"}}}, "type int needs whole-number bounds"),
    ({"space": {"model.act": []}}, "needs a non-empty list of choices"),
    ({"budget": 2, "batch": 3}, "mobo.budget (2) is smaller than mobo.batch (3)"),
    ({"initial": 9}, "mobo.initial (9) is larger than mobo.budget (6)"),
    ({"acquisition": "ehvi"}, "mobo.acquisition 'ehvi': choose one of random, qlognehvi, binom, joint, nested"),
    ({"horizon": 0}, "mobo.horizon must be a whole number"),
    ({"objectives": {"final_loss": "min"}}, "must map at least two summary numbers"),
    ({"objectives": {"final_loss": "down", "params": "min"}}, "direction must be min or max"),
    ({"effort": {"restarts": 2, "speed": 3}}, "mobo.effort must map some of"),
    ({"turbo": True}, "mobo has unknown key(s) ['turbo']"),
])
def test_bad_mobo_specs_name_the_key(mobo, expected):
    from scaleyard.platform.config import ConfigError

    with pytest.raises(ConfigError) as error:
        mobo_spec(**mobo)
    assert expected in str(error.value)


@pytest.mark.parametrize("extra,expected", [
    ("mobo: {budget: 3}\n", "has a 'mobo' section: add 'strategy: mobo'"),
    ("strategy: bayes\n", "'strategy' 'bayes': the only strategy is mobo"),
    ("strategy: mobo\n", "strategy mobo needs a 'mobo' section"),
    ("strategy: mobo\ngrid: {optim.lr: [0.1]}\nmobo: {budget: 3}\n", "strategy mobo proposes its own runs"),
    ("strategy: mobo\nbase: [optim.lr=0.1]\nmobo: {space: {optim.lr: {low: 0.01, high: 0.1}}, "
     "objectives: {final_loss: min, params: min}, budget: 3, batch: 1}\n", "['optim.lr'] are both in 'base'"),
])
def test_spec_sections_fit_together(tmp_path, extra, expected):
    from scaleyard.platform.config import ConfigError
    from scaleyard.platform.sweep_spec import SweepSpec

    spec = tmp_path / "spec.yaml"
    spec.write_text("job: classify\n" + extra)
    with pytest.raises(ConfigError) as error:
        SweepSpec.load(spec)
    assert expected in str(error.value) and str(spec) in str(error.value)


def test_a_bad_spec_fails_on_the_command_line_before_anything_is_written(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("job: classify\nstrategy: mobo\nmobo:\n"
                    "  space: {optim.lr: {low: 1.0e-3, high: 1.0e-1, log: true}}\n"
                    "  objectives: {final_loss: min, eval/fid: min, wall_hours: min}\n  budget: 4\n  batch: 2\n")
    done = scaleyard("sweep", str(spec), "--dir", str(tmp_path / "sweep"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "mobo.objectives.wall_hours: 'wall_hours' is not a number runs report" in done.stderr
    assert not (tmp_path / "sweep").exists()


def test_the_normalized_spec_round_trips_and_grids_read_as_before(tmp_path):
    from scaleyard.platform.sweep_spec import SweepSpec

    spec = mobo_spec(space={**SPACE, "model.act": ["relu", "gelu"]},
                     objectives={"eval/accuracy": "max", "flops": {"direction": "min", "log": True}})
    again = SweepSpec.load(_write(tmp_path / "s.yaml", spec.dump()))
    assert again.as_dict() == spec.as_dict()
    assert spec.mobo["objectives"] == {"eval.accuracy": {"direction": "max", "log": False, "ref": None},
                                       "compute_flops": {"direction": "min", "log": True, "ref": None}}
    grid = SweepSpec.from_dict({"job": "classify", "grid": {"optim.lr": [0.1]}})
    assert "strategy" not in grid.as_dict() and "mobo" not in grid.dump()  # older manifests still match


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- search space and hypervolume ---------------------------------------------------------------

def test_the_unit_cube_maps_onto_ranges_integers_choices_and_back():
    from scaleyard.platform.mobo_spec import Param

    lr = Param("optim.lr", "float", 1e-4, 1e-1, log=True)
    width = Param("model.width", "int", 4, 32, log=True)
    act = Param("model.act", "choice", choices=("relu", "gelu", "silu"))
    assert (lr.decode(0.0), lr.decode(1.0), lr.decode(0.5)) == (1e-4, 1e-1, 0.003162)
    assert (width.decode(0.0), width.decode(1.0), width.decode(0.5)) == (4, 32, 11)
    assert [act.decode(u) for u in (0.0, 0.34, 0.99, 1.0)] == ["relu", "gelu", "silu", "silu"]
    for param in (lr, width, act):
        for u in (0.0, 0.123, 0.5, 0.77, 1.0):
            snapped = param.encode(param.decode(u))
            assert 0.0 <= snapped <= 1.0 and param.decode(snapped) == param.decode(u)  # snapping is idempotent


def test_hypervolume_is_exact_against_botorch():
    import torch
    from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning

    from scaleyard.platform.sweep_mobo_report import hypervolume, pareto_mask

    assert hypervolume([[1.0, 1.0]], [0.0, 0.0]) == 1.0
    assert hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0]) == 3.0
    assert pareto_mask([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0], [2.0, 1.0]]) == [True, True, False, True]
    generator = torch.Generator().manual_seed(0)
    for m in (2, 3):
        points = torch.rand(25, m, generator=generator, dtype=torch.double)
        ref = torch.full((m,), 0.1, dtype=torch.double)
        expected = DominatedPartitioning(ref_point=ref, Y=points).compute_hypervolume().item()
        assert hypervolume(points.tolist(), ref.tolist()) == pytest.approx(expected, rel=1e-12)


# --- acquisitions -------------------------------------------------------------------------------

def toy(x):
    """Two objectives to maximize on [0,1]^2 with a known front: x[1] = 0.5, f2 = -(1 - sqrt(f1'))."""
    import torch

    g = 4 * (x[..., 1] - 0.5) ** 2
    return torch.stack([-x[..., 0], -(1 - x[..., 0].sqrt() + g)], dim=-1)


@pytest.fixture(scope="module")
def fitted():
    import torch

    from scaleyard.platform import mobo_acquisition as A

    x = torch.quasirandom.SobolEngine(2, scramble=True, seed=3).draw(8, dtype=torch.double)
    y = toy(x)
    ref = torch.tensor([-1.1, -2.1], dtype=torch.double)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures start before the autouse one_thread)
    model = A.fit_model(x, y)
    torch.set_num_threads(threads)
    return x, y, ref, model, A.mean_front(model, x, ref)


FAST = {"restarts": 1, "raw_samples": 8, "maxiter": 5, "mc_samples": 8, "nested_candidates": 1}


@pytest.mark.parametrize("acquisition", ["random", "binom", "joint", "nested"])  # qlognehvi: the driver tests
def test_proposals_lie_in_bounds_and_keep_their_types(fitted, acquisition):
    import torch

    from scaleyard.platform.mobo_acquisition import Effort, propose
    from scaleyard.platform.mobo_spec import MoboSpec

    x, y, ref, _, _ = fitted
    mobo = MoboSpec.from_dict(mobo_spec(space={"optim.lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                               "model.act": ["relu", "gelu", "silu"]}).mobo)
    snap = lambda u: torch.tensor(mobo.snap(u.tolist()), dtype=torch.double)  # noqa: E731
    xs = torch.stack([snap(p) for p in x])
    points = propose(xs, y, ref, 2, acquisition, 2, Effort(**FAST), seed=5, snap=snap)
    assert points.shape == (2, 2) and bool(((points >= 0) & (points <= 1)).all())
    values = [mobo.decode(p.tolist()) for p in points]
    assert all(1e-3 <= v["optim.lr"] <= 1e-1 and v["model.act"] in ("relu", "gelu", "silu") for v in values)
    assert all(p.tolist() == mobo.snap(p.tolist()) for p in points)  # what runs is what the model sees
    seen = {tuple(p.tolist()) for p in xs}
    assert len({tuple(p.tolist()) for p in points} - seen) == 2  # new, and not the same twice
    if acquisition == "binom":
        again = propose(xs, y, ref, 2, acquisition, 2, Effort(**FAST), seed=5, snap=snap)
        assert torch.equal(points, again)  # the same data and seed give the same proposals


def test_with_horizon_one_the_lookahead_values_are_analytic_ehvi(fitted):
    import torch

    from scaleyard.platform import mobo_acquisition as A
    from scaleyard.platform import mobo_spec

    assert mobo_spec.ACQUISITIONS == A.ACQUISITIONS  # the spec checks them without importing torch
    x, y, ref, model, front = fitted
    X = torch.rand(6, 1, 2, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    joint = A.JointLookahead(model, ref, front, A.Effort(), 0)
    ehvi = A.ExpectedHypervolumeImprovement(model, ref.tolist(), front)(X)
    assert torch.equal(joint(X), ehvi) and bool((ehvi > 0).any())
    assert A.nested_value(model, ref, front, X[0, 0], 1, A.Effort(), 0) == pytest.approx(ehvi[0].item(), rel=1e-12)
    # a second step only adds (hypervolume improvement is never negative)
    X2 = torch.cat([X, torch.rand(6, 1, 2, dtype=torch.double, generator=torch.Generator().manual_seed(2))], dim=1)
    assert bool((joint(X2) >= ehvi - 1e-12).all())


def test_fantasy_conditioning_matches_botorch_and_the_telescoped_front(fitted):
    import torch
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    from scaleyard.platform import mobo_acquisition as A

    x, y, ref, model, front = fitted
    gen = torch.Generator().manual_seed(4)
    x1, x2 = torch.rand(3, 1, 2, dtype=torch.double, generator=gen), torch.rand(3, 1, 2, dtype=torch.double,
                                                                                generator=gen)
    for fantasies in (1, 3):
        lookahead = A.LookaheadValue(model, ref, front, A.Effort(fantasies=fantasies), 0)
        moments = lookahead.fantasy_moments(x1, x2)
        y1 = torch.stack([m[0] for m in moments], dim=-1).unsqueeze(-2)
        conditioned = A._condition(model, x1, y1)  # BoTorch's condition_on_observations
        assert torch.allclose(conditioned.posterior(x2).mean, torch.stack([m[1] for m in moments], dim=-1),
                              atol=1e-9)
        for sub, (_, _, cov) in zip(conditioned.models, moments):
            assert torch.allclose(sub.posterior(x2).distribution.covariance_matrix, cov, atol=1e-9)
    # H = 2, posterior-mean fantasy: the lookahead term is EHVI(x2) under the conditioned model,
    # measured from the front with the fantasy added (MC against analytic, so a tolerance)
    lookahead = A.LookaheadValue(model, ref, front, A.Effort(mc_samples=1024), 0)
    value = lookahead(x1, x2)[0]
    with torch.no_grad():
        for b in range(3):
            mean1 = model.posterior(x1[b]).mean
            conditioned = A._condition(model, x1[b], mean1)
            updated = FastNondominatedPartitioning(ref, torch.cat([model.posterior(x).mean, mean1]))
            exact = A.ExpectedHypervolumeImprovement(conditioned, ref.tolist(), updated)(x2[b : b + 1]).item()
            assert value[b].item() == pytest.approx(exact, rel=0.05, abs=1e-4)


def test_nested_is_at_least_joint_at_the_same_first_point(fitted):
    import torch

    from scaleyard.platform import mobo_acquisition as A

    x, y, ref, model, front = fitted
    effort = A.Effort(**FAST)
    joint = A.JointLookahead(model, ref, front, effort, 0)
    X = torch.tensor([[[0.3, 0.5], [0.8, 0.5]]], dtype=torch.double)
    with torch.no_grad():
        joint_value = joint(X).item()
    nested = A.nested_value(model, ref, front, X[0, 0], 2, effort, 0, warm=X[0, 1:])
    assert nested >= joint_value - 1e-9


# --- the driver, through a Launcher that computes the toy instead of training -------------------

class ToyLauncher:
    """Runs nothing: each run "finishes" at once with the toy's objectives in summary.json
    (final_loss = f1, eval.f2), except runs named in `fail`; `crash_on` raises inside the n-th
    submission, after the driver has recorded it (a driver killed at the worst moment)."""

    world_size, gpu_memory_gb, runs_here = 1, None, True

    def __init__(self, fail: set[str] = frozenset(), crash_on: int | None = None):
        self.fail, self.crash_on, self.calls, self.started = set(fail), crash_on, 0, []

    def submit_array(self, runs, name, folder, concurrency, on_wait=None):
        self.calls += 1
        if self.crash_on == self.calls:
            raise KeyboardInterrupt("driver killed")
        for run in runs:
            run_dir = Path(run.run_dir)
            self.started.append(run_dir.name)
            overrides = dict(o.split("=", 1) for o in run.overrides)
            lr, width = float(overrides["optim.lr"]), int(overrides["model.width"])
            f2 = 1 - math.sqrt(lr) + ((width - 4.5) / 3.5) ** 2
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            state = "FAILED" if run_dir.name in self.fail else "COMPLETED"
            (run_dir / "logs" / "rank0.json").write_text(json.dumps(
                {"rank": 0, "world_size": 1, "state": state, "pid": 1, "host": "toy", "started": time.time(),
                 "reason": "RuntimeError: toy failure"}))
            if state == "COMPLETED":
                (run_dir / "summary.json").write_text(json.dumps({"step": 1, "final_loss": lr, "eval": {"f2": f2}}))

    def state(self, run_dir):
        record = Path(run_dir) / "logs" / "rank0.json"
        return json.loads(record.read_text())["state"] if record.exists() else ""


def _drive(spec, sweep_dir, launcher):
    from scaleyard.platform.sweep import launch

    return launch(spec, sweep_dir, launcher)


def test_rounds_raise_the_hypervolume_and_a_crash_resumes_to_the_same_proposals(tmp_path, classify_args):
    spec = mobo_spec(classify_args, budget=4, effort=FAST)
    whole = ToyLauncher()
    result = _drive(spec, tmp_path / "whole", whole)
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert result["rounds"] == 2 and result["runs"] == 4 and len(whole.started) == 4 == len(set(whole.started))
    assert [r["name"] for r in manifest["runs"]] == ["r00-000", "r00-001", "r01-002", "r01-003"]
    assert all(0.01 <= r["values"]["optim.lr"] <= 1 and isinstance(r["values"]["model.width"], int)
               and 1 <= r["values"]["model.width"] <= 8 for r in manifest["runs"])
    from scaleyard.platform.sweep_mobo_report import hypervolume

    def volume_after(rnd):
        pts = [[-r["objectives"]["final_loss"], -r["objectives"]["eval.f2"]] for r in manifest["runs"]
               if r["round"] <= rnd]
        return hypervolume(pts, manifest["ref_point"])

    assert volume_after(0) < volume_after(1) == pytest.approx(result["hypervolume"])

    crashed = ToyLauncher(crash_on=2)  # killed while submitting round 1, after recording it
    with pytest.raises(KeyboardInterrupt):
        _drive(spec, tmp_path / "crashed", crashed)
    resumed = ToyLauncher()
    again = _drive(spec, tmp_path / "crashed", resumed)
    assert again["skipped"] == ["r00-000", "r00-001"] and resumed.started[:2] == ["r01-002", "r01-003"]
    redone = json.loads((tmp_path / "crashed" / "manifest.json").read_text())
    assert [(r["name"], r["values"]) for r in redone["runs"]] == [(r["name"], r["values"]) for r in manifest["runs"]]
    assert all(r["attempts"] == 1 for r in redone["runs"])
    assert _drive(spec, tmp_path / "crashed", ToyLauncher())["submitted"] == []  # done: nothing more to run


def test_failed_runs_are_retried_a_bounded_number_of_times_then_recorded(tmp_path, classify_args):
    spec = mobo_spec(classify_args, budget=4, retries=1, effort=FAST)
    launcher = ToyLauncher(fail={"r00-001"})
    result = _drive(spec, tmp_path / "sweep", launcher)
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    assert launcher.started.count("r00-001") == 2 and result["runs"] == 4
    failed = manifest["runs"][1]
    assert failed["state"] == "failed" and failed["attempts"] == 2 and "FAILED" in failed["reason"]
    assert (tmp_path / "sweep" / "r00-001.attempt1" / "logs" / "rank0.json").exists()  # the first try's logs kept
    assert "r00-001" not in result["front"]
    lines = "\n".join(__import__("scaleyard.platform.sweep_mobo_report", fromlist=["x"]).status_lines(
        tmp_path / "sweep"))
    assert "2 round(s), 4/4 runs proposed, 3 completed, 1 failed" in lines and "Pareto front" in lines


# --- a real sweep: classify, killed mid-way, resumed by the same command ------------------------

@pytest.mark.slow  # about 2 minutes on 2 busy cores: two rounds of real runs, a kill, a resume
def test_a_real_mobo_sweep_is_killed_and_the_same_command_resumes_it(tmp_path, classify_args):
    sweep_dir = tmp_path / "sweep"
    spec = tmp_path / "mobo.yaml"
    spec.write_text(json.dumps({
        "job": "classify", "preset": "tiny",
        "base": [*(a for a in classify_args if not a.startswith("model.width=")), "train.steps=4"],
        "strategy": "mobo", "concurrency": 2,
        "mobo": {"space": {"optim.lr": {"low": 1e-3, "high": 1e-1, "log": True},
                           "model.width": {"low": 2, "high": 8, "type": "int"}},
                 "objectives": {"final_loss": "min", "compute_flops": {"direction": "min", "log": True}},
                 "budget": 4, "batch": 2, "initial": 2, "acquisition": "joint", "horizon": 2,
                 "effort": {"restarts": 2, "raw_samples": 16, "maxiter": 10, "mc_samples": 16}}}))
    command = [sys.executable, "-m", "scaleyard.platform.cli", "sweep", str(spec), "--dir", str(sweep_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill the driver once round 0 is recorded and running
        assert driver.poll() is None, driver.stdout.read()
        manifest = _read(sweep_dir / "manifest.json")
        if manifest and any(r["state"] == "submitted" for r in manifest["runs"]):
            break
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: its runs go on
    driver.wait()
    first = {r["name"]: r["values"] for r in _read(sweep_dir / "manifest.json")["runs"]}
    assert list(first) == ["r00-000", "r00-001"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = _read(sweep_dir / "manifest.json")
    assert [r["name"] for r in manifest["runs"]] == ["r00-000", "r00-001", "r01-002", "r01-003"]
    assert {r["name"]: r["values"] for r in manifest["runs"][:2]} == first  # not proposed anew
    assert all(r["state"] == "completed" and r["attempts"] == 1 for r in manifest["runs"]), manifest["runs"]
    for run in manifest["runs"]:  # each trained once: one start in its rank log, no retry folders
        log = (sweep_dir / run["name"] / "logs" / "rank0.log").read_text()
        assert log.count("rank 0 of 1 started") == 1, run["name"]
    assert not list(sweep_dir.glob("*.attempt*"))
    assert "mobo round 1: joint proposed 2 run(s)" in done.stdout
    status = scaleyard("status", str(sweep_dir))
    assert "2 round(s), 4/4 runs proposed, 4 completed, 0 failed" in status.stdout, status.stdout
    assert "hypervolume" in status.stdout and "Pareto front" in status.stdout
    report = scaleyard("sweep", "report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    assert (sweep_dir / "report" / "pareto.png").stat().st_size > 1000
    table = (sweep_dir / "report" / "pareto.md").read_text()
    assert table.count("| completed |") == 4 and "| optim.lr | model.width | final_loss | compute_flops |" in table


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
