"""Stages (platform/stages.py) at the platform level: a data-build stage runs a real builder into the
run's folder once, fills the config key, and refuses a folder built with other options; a job's
stage list is checked before anything is written. Training stages run end to end in
tests/test_fspo.py (one command, and 2 ranks under ZeRO-3 with a SIGKILL in the stage) and
tests/test_tfg_flow.py (two predictor stages before a flow run)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from scaleyard.data_loaders.index import load_index
from scaleyard.platform.config import ConfigError, to_dotlist
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.stages import Stage, prepare_stages, run_stages


class DataJob:
    """What prepare_stages asks of a job: its name and its stages for a config."""

    name = "data_job"

    def __init__(self, **options):
        self.options = {"limit": 6, "resolution": 8, **options}

    def stages(self, cfg):
        if cfg.data.path:
            return []
        return [Stage("shapes", {"data.path": "train", "data.eval_path": "test"}, build="shapes",
                      options=self.options, shard_size=4)]


def config(run_dir, path=""):
    return OmegaConf.create({"run": {"dir": str(run_dir)}, "data": {"path": path, "eval_path": ""}})


def test_a_build_stage_fills_its_keys_builds_once_and_refuses_other_options(tmp_path):
    cfg = config(tmp_path / "run")
    stages = prepare_stages(DataJob(), cfg, 1, None, True)
    folder = tmp_path / "run" / "stages" / "shapes"
    assert cfg.data.path == str(folder / "train") and cfg.data.eval_path == str(folder / "test")
    assert not folder.exists()  # preparing writes nothing
    run_stages(stages, DistEnv())
    assert load_index(cfg.data.path).total == 6 and load_index(cfg.data.eval_path).total == 6
    built_at = (folder / "train" / "index.json").stat().st_mtime_ns
    run_stages(prepare_stages(DataJob(), config(tmp_path / "run"), 1, None, True), DistEnv())  # built: skipped
    assert (folder / "train" / "index.json").stat().st_mtime_ns == built_at  # builds are deterministic: not rewritten
    assert json.loads((folder / "stage.json").read_text())["options"] == {"limit": 6, "resolution": 8}
    with pytest.raises(ConfigError, match="stages/shapes holds data built with other options"):
        prepare_stages(DataJob(limit=7), config(tmp_path / "run"), 1, None, True)
    # an input the user gives is not a stage
    assert prepare_stages(DataJob(), config(tmp_path / "other", path="data/x"), 1, None, True) == []


def test_stage_lists_and_overrides_are_checked_before_anything_runs(tmp_path):
    cfg = config(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"override 'stages.nope.train.steps=1'.*this run's stages: shapes"):
        prepare_stages(DataJob(), cfg, 1, None, True, ["stages.nope.train.steps=1"])
    with pytest.raises(ConfigError, match="is a data build"):
        prepare_stages(DataJob(), config(tmp_path / "run"), 1, None, True, ["stages.shapes.limit=2"])
    with pytest.raises(ConfigError, match="unknown data builder 'nope'"):
        job = DataJob()
        job.stages = lambda cfg: [Stage("x", {"data.path": ""}, build="nope")]
        prepare_stages(job, config(tmp_path / "run"), 1, None, True)
    with pytest.raises(ConfigError, match="fills config key 'model.init_from', which the job's config does not have"):
        job.stages = lambda cfg: [Stage("x", {"model.init_from": ""}, build="shapes")]
        prepare_stages(job, config(tmp_path / "run"), 1, None, True)
    with pytest.raises(ValueError, match="exactly one of job= .* or build="):
        Stage("x", {"data.path": ""})
    assert not (tmp_path / "run").exists()


def test_to_dotlist_round_trips_strings_lists_and_nesting():
    node = {"model": {"name": "a b=c,d", "empty": "", "sizes": [1, 2]}, "lr": 1e-4, "on": True, "none": None}
    assert OmegaConf.to_container(OmegaConf.from_dotlist(to_dotlist(node))) == node
