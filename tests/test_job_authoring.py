"""Bringing your own job, as a newcomer would: `scaleyard new` writes a job package in a temp
folder; it is registered through the entry point its pyproject.toml declares (a `.dist-info`
folder, as `pip install` leaves one, on PYTHONPATH) and driven through the real CLI: run, SIGKILL
mid-run + rerun (same final weights as an uninterrupted run), `--nproc 2`, a command-line multirun
sweep, `status`; its own tests pass and it is ruff-clean. Plus the scaffold's refusals."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaleyard.platform.checkpoint import PAUSE_ENV
from scaleyard.platform.scaffold import ScaffoldError, new_job
from scaleyard.platform.sweep_spec import SweepSpec
from scaleyard.platform.weights import load_run_weights

from conftest import REPO, scaleyard

JOB = "authored_job"


def register(package_dir: Path, site: Path, job: str = JOB) -> dict:
    """What `pip install -e package_dir` would make visible, read from the package's own
    pyproject.toml; returns the environment that sees it. (tomllib is 3.11+; the project
    supports 3.10, and these three keys are plain `key = "value"` lines.)"""
    pyproject = (package_dir / "pyproject.toml").read_text()
    name, version = (re.search(rf'^{key} = "(.+)"$', pyproject, re.M).group(1) for key in ("name", "version"))
    section = pyproject.split('[project.entry-points."scaleyard.jobs"]\n', 1)[1].split("\n\n", 1)[0]
    entry_points = dict(re.findall(r'^(\w+) = "(.+)"$', section, re.M))
    assert entry_points == {job: f"{job}.job:JOB"}, section
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {target}\n" for key, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[scaleyard.jobs]\n{lines}")
    return {"PYTHONPATH": os.pathsep.join([str(package_dir), str(site), os.environ.get("PYTHONPATH", "")])}


def run_command(run_dir: Path, *extra: str) -> list[str]:
    return ["run", JOB, "--preset", "tiny", f"run.dir={run_dir}", *extra]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def kill_mid_run(command: list[str], env: dict, checkpoints: Path) -> None:
    """Start the run with a pause injected while it writes checkpoint 20 (of 40), and SIGKILL its
    process group there: checkpoint 10 is complete, 20 is not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env, PAUSE_ENV: "60@20"}
    process = subprocess.Popen([sys.executable, "-m", "scaleyard.platform.cli", *command], env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (checkpoints / ".tmp-step_00000020" / "train_state.pt").exists():
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_scaffolded_job_runs_resumes_exactly_scales_out_and_shows_in_status(tmp_path):
    made = scaleyard("new", JOB, "--dir", str(tmp_path / "package"))
    assert made.returncode == 0, made.stdout + made.stderr
    package = tmp_path / "package"
    env = register(package, tmp_path / "site")

    runs = tmp_path / "runs"
    reference = scaleyard(*run_command(runs / "reference"), env=env)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert summary(runs / "reference")["step"] == 40
    assert summary(runs / "reference")["eval"]["accuracy"] > 0.5  # it learns (chance is 0.25)

    interrupted = runs / "interrupted"
    kill_mid_run(run_command(interrupted), env, interrupted / "checkpoints")
    assert not (interrupted / "summary.json").exists()
    resumed = scaleyard(*run_command(interrupted), env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "step 10" in resumed.stdout
    assert summary(interrupted)["weights_sha256"] == summary(runs / "reference")["weights_sha256"]

    # two gloo ranks take half of each global batch each: the same training up to float summation order
    two = scaleyard(*run_command(runs / "two_ranks", "--nproc", "2"), env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert summary(runs / "two_ranks")["world_size"] == 2
    one_rank, two_ranks = load_run_weights(runs / "reference").weights, load_run_weights(runs / "two_ranks").weights
    assert one_rank.keys() == two_ranks.keys()
    for name in one_rank:
        torch.testing.assert_close(two_ranks[name], one_rank[name], rtol=0, atol=1e-5)

    # a command-line multirun through the local submitit executor; lr=1e-2 is the tiny preset's own
    sweep = scaleyard("sweep", JOB, "--preset", "tiny", "optim.lr=3e-3,1e-2", "--dir", str(runs / "sweep"), "--wait",
                      env=env)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert summary(runs / "sweep" / "lr-1e-2")["weights_sha256"] == summary(runs / "reference")["weights_sha256"]

    status = scaleyard("status", str(runs), "--json", env=env)
    assert status.returncode == 0, status.stderr
    rows = {Path(row["run"]).relative_to(runs).as_posix(): row for row in json.loads(status.stdout)}
    assert set(rows) == {"reference", "interrupted", "two_ranks", "sweep/lr-3e-3", "sweep/lr-1e-2"}
    assert all(row["step"] == 40 and row["state"] == "COMPLETED" for row in rows.values()), rows
    assert rows["sweep/lr-1e-2"]["values"] == {"optim.lr": "1e-2"}
    assert [run for run, row in rows.items() if row.get("best")] == ["sweep/lr-1e-2"]  # lowest final_loss

    # the package's own tests, less the one that repeats the CLI run above
    own_tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                                "not scaleyard_trains_it", str(package / "tests")], cwd=package,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                               timeout=300)
    assert own_tests.returncode == 0, own_tests.stdout + own_tests.stderr
    assert "2 passed, 1 deselected" in own_tests.stdout

    ruff = Path(sys.executable).parent / "ruff"
    lint = subprocess.run([str(ruff), "check", "--isolated", "--select", "E,F,W,I,B,UP", "--line-length", "120",
                           "--target-version", "py310", "."], cwd=package, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_new_refuses_names_and_folders_it_cannot_use(tmp_path):
    refused = scaleyard("new", "classify", "--dir", str(tmp_path / "c"))
    assert refused.returncode == 2
    assert "already registered by module scaleyard.jobs.classify.job" in refused.stderr
    assert not (tmp_path / "c").exists()
    for name, words in (("My-Job", "lower-case letters"), ("class", "lower-case letters"),
                        ("json", "already importable")):
        with pytest.raises(ScaffoldError, match=words):
            new_job(name, tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="not an empty folder"):
        new_job("fresh_job", tmp_path / "taken")
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]
    folder, names, files = new_job("fresh_job", tmp_path / "empty_is_fine")
    assert names.class_name == "FreshJobJob" and Path("fresh_job/job.py") in files
    assert "fresh_job = \"fresh_job.job:JOB\"" in (folder / "pyproject.toml").read_text()


def readme_section(title: str) -> str:
    return (REPO / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_example_job_trains_and_its_sweep_spec_loads(tmp_path):
    """The README's hand-written job (every block headed by its file name) is complete: written
    out as a package, it registers and trains; its sweep spec is valid."""
    blocks = re.findall(r"```(?:python|toml|yaml)\n(.*?)```", readme_section("Bring your own job"), re.S)
    files = {block.splitlines()[0].removeprefix("# "): block for block in blocks
             if re.match(r"# [\w/]+\.(py|toml|yaml)\n", block)}
    assert set(files) == {"my_job/job.py", "pyproject.toml", "my_job/presets/tiny.yaml"}
    package = tmp_path / "package"
    for name, text in {**files, "my_job/__init__.py": ""}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    env = register(package, tmp_path / "site", job="my_job")
    done = scaleyard("run", "my_job", "--preset", "tiny", f"run.dir={tmp_path / 'run'}", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = summary(tmp_path / "run")
    assert result["step"] == 30 and result["eval"]["mse"] < 1.0  # from ~3.5 (the targets' variance)

    (spec_text,) = [block for block in blocks if block.startswith("job: my_job")]
    (tmp_path / "spec.yaml").write_text(spec_text)
    spec = SweepSpec.load(tmp_path / "spec.yaml")
    assert spec.grid == {"optim.lr": [1e-3, 3e-3], "model.hidden": [32, 64]} and spec.metric == "eval.mse"
