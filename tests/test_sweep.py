"""Sweeps: specs checked field by field before anything is written, Hydra-style multirun from the
command line, the Launcher interface, progress while waiting, and the best run in `status`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import scaleyard


def test_a_scalar_where_a_list_belongs_is_one_clear_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("job: classify\ngrid: {optim.lr: 1e-3}\n")  # PyYAML alone reads '1e-3' and iterates it
    done = scaleyard("sweep", str(spec), "--dir", str(tmp_path / "sweep"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert ("grid key 'optim.lr' needs a list of values, got the single value 0.001; write [0.001] to sweep over "
            "it, or put optim.lr=0.001 in 'base'") in done.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("body,expected", [
    ("grid: {optim.lr: 0.001}", "grid key 'optim.lr' needs a list of values, got the single value 0.001"),
    ("grid: {optim.lr: '1e-3'}", "got the single value '1e-3' (YAML 1.1 reads numbers like 1e-3 as text"),
    ("grid: {optim.lr: []}", "grid key 'optim.lr' has no values"),
    ("grid: [optim.lr]", "'grid' must map an override key to its values"),
    ("isoflop: {values: uvit-cpu-xs, budgets: [1e12]}", "'isoflop.values' needs a list of values"),
    ("isoflop: {values: [uvit-cpu-xs], budgets: [lots]}", "isoflop.budgets entry 'lots' is not a positive number"),
    ("isoflop: {values: [a], budgets: [1e12], steps: 3}", "isoflop has unknown key(s) ['steps']"),
    ("grid: {optim.lr: [0.1]}\nconcurrency: two", "'concurrency' must be a whole number"),
    ("grid: {optim.lr: [0.1]}\nbase: train.steps=3", "'base' must be a list of overrides"),
    ("grid: {optim.lr: [0.1]}\nbase: [run.dir=x]", "'base' sets run.dir"),
    ("grid: {optim.lr: [0.1]}\ndirection: up", "'direction' must be min or max"),
    ("grid: {optim.lr: [0.1]\n", "is not valid YAML"),
])
def test_spec_shapes_are_checked_and_name_the_key(tmp_path, body, expected):
    from scaleyard.platform.config import ConfigError
    from scaleyard.platform.sweep_spec import SweepSpec

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"job: classify\n{body}\n")
    with pytest.raises(ConfigError) as error:
        SweepSpec.load(spec)
    assert expected in str(error.value) and str(spec) in str(error.value)


def test_numbers_written_like_1e_3_are_numbers(tmp_path):
    from scaleyard.platform.sweep_spec import SweepSpec

    spec = tmp_path / "s.yaml"
    spec.write_text("job: classify\ngrid: {optim.lr: [1e-3, 3.0e-3]}\nisoflop: {}\n")
    assert SweepSpec.load(spec).grid == {"optim.lr": [0.001, 0.003]}  # PyYAML alone gives '1e-3'


class RecordingLauncher:
    """A Launcher that runs nothing: what the platform hands over, with no cluster imported."""

    world_size, gpu_memory_gb, runs_here = 2, None, True

    def __init__(self, states: dict[str, str]):
        self.states, self.submitted = states, []

    def submit_array(self, runs, name, folder, concurrency, on_wait=None):
        self.submitted.append((runs, name, concurrency))

    def state(self, run_dir):
        return self.states.get(Path(run_dir).name, "")


def test_sweeps_reach_a_cluster_only_through_the_launcher(tmp_path, classify_args):
    from scaleyard.platform.sweep import launch
    from scaleyard.platform.sweep_spec import SweepSpec

    spec = SweepSpec.from_overrides("classify", "tiny", [*classify_args, "optim.lr=1e-3,3e-3", "model.width=4,8"],
                                    concurrency=3)
    launcher = RecordingLauncher({"width-8_lr-1e-3": "RUNNING"})
    result = launch(spec, tmp_path / "sweep", launcher)
    assert result["skipped"] == ["width-8_lr-1e-3"]  # queued or running: not submitted twice
    [(runs, name, concurrency)] = launcher.submitted
    assert name == "sy-sweep-classify" and concurrency == 3
    assert [Path(r.run_dir).name for r in runs] == ["width-4_lr-1e-3", "width-4_lr-3e-3", "width-8_lr-3e-3"]
    assert "optim.lr=3e-3" in runs[1].overrides and "model.width=4" in runs[1].overrides
    config = (tmp_path / "sweep" / "width-4_lr-3e-3" / "config.yaml").read_text()
    assert "lr: 0.003" in config  # '3e-3' typed on the command line means the number, as with `run`


def test_command_line_multirun_waits_with_progress_and_resumes(tmp_path, classify_args):
    sweep_dir = tmp_path / "sweep"
    done = scaleyard("sweep", "classify", "--preset", "tiny", *classify_args, "train.steps=4", "optim.lr=1e-3,3e-2",
                     "--concurrency", "2", "--dir", str(sweep_dir), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0/2 completed" in done.stdout and "2/2 completed, 0 running, 0 failed" in done.stdout
    assert "ETA" in done.stdout
    spec = (sweep_dir / "spec.yaml").read_text()
    assert "optim.lr:\n  - '1e-3'\n  - '3e-2'" in spec and "train.steps=4" in spec
    rows = json.loads(scaleyard("status", str(sweep_dir), "--json").stdout)
    assert [row["values"] for row in rows] == [{"optim.lr": "1e-3"}, {"optim.lr": "3e-2"}]
    assert all(row["state"] == "COMPLETED" for row in rows)
    [best] = [row for row in rows if row["best"]]
    assert best["loss"] == min(row["loss"] for row in rows)
    again = scaleyard("sweep", str(sweep_dir / "spec.yaml"))  # the sweep folder is the spec's own
    assert again.returncode == 0 and "submitted 0, skipped 2" in again.stdout, again.stdout + again.stderr
    nothing = scaleyard("sweep", "classify", "optim.lr=1e-3", "--dir", str(tmp_path / "x"))
    assert nothing.returncode == 2 and "nothing to sweep" in nothing.stderr


def test_status_marks_the_best_run_by_the_specs_metric(tmp_path):
    sweep_dir = tmp_path / "sweep"
    runs = {"a": (0.5, 0.7), "b": (0.4, 0.6), "c": (0.6, 0.9)}  # name: (final_loss, eval accuracy)
    spec = {"job": "classify", "grid": {"optim.lr": list(runs)}, "metric": "eval.accuracy", "direction": "max"}
    manifest = {"spec": spec, "runs": [{"name": n, "overrides": [f"optim.lr={n}"], "values": {"optim.lr": n}}
                                       for n in runs]}
    sweep_dir.mkdir()
    (sweep_dir / "manifest.json").write_text(json.dumps(manifest))
    for name, (loss, accuracy) in runs.items():
        (sweep_dir / name).mkdir()
        (sweep_dir / name / "config.yaml").write_text("train:\n  steps: 10\n")
        (sweep_dir / name / "summary.json").write_text(json.dumps(
            {"job": "classify", "step": 10, "final_loss": loss, "eval": {"loss": loss, "accuracy": accuracy}}))
    rows = json.loads(scaleyard("status", str(sweep_dir), "--json").stdout)
    assert [(Path(r["run"]).name, r["best"], r["metric"], r["metric_value"]) for r in rows] == [
        ("a", False, "eval.accuracy", 0.7), ("b", False, "eval.accuracy", 0.6), ("c", True, "eval.accuracy", 0.9)]
    table = scaleyard("status", str(sweep_dir)).stdout.splitlines()
    assert table[3].startswith("* ") and "accuracy=0.9" in table[3] and "lr=c" in table[3]
    assert table[-1] == "* best run of its sweep"
    del spec["metric"], spec["direction"]  # default: the lowest final_loss
    (sweep_dir / "manifest.json").write_text(json.dumps(manifest))
    rows = json.loads(scaleyard("status", str(sweep_dir), "--json").stdout)
    assert [r["best"] for r in rows] == [False, True, False]
