"""The tfg_flow job end to end on a small real QM9 subset: disjoint splits in the index, RDKit
checks on real and corrupted molecules, predictor and flow runs through the CLI, report.md,
`scaleyard sample`, guided sampling with target errors, and exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from scaleyard.data_loaders.builders import build
from scaleyard.data_loaders.builders.qm9 import splits as qm9_splits
from scaleyard.data_loaders.index import load_index
from scaleyard.jobs.tfg_flow.chemistry import check_molecule, chemistry_metrics, reference_smiles
from scaleyard.jobs.tfg_flow.data import read_molecules

from conftest import scaleyard

SPLITS = ("heldout", "oracle", "guide", "flow")


@pytest.fixture(scope="module")
def qm9(tmp_path_factory):
    out = tmp_path_factory.mktemp("qm9_tfg")
    build("qm9", out, shard_size=20, limit=40, heavy_atoms_only=True, tfg_splits=True)
    return out


def test_tfg_splits_are_disjoint_recorded_and_the_default_build_is_unchanged(qm9):
    keys = {}
    for split in SPLITS:
        index = load_index(qm9 / split)
        assert index.total == 40 or split == "heldout"
        assert index.extra["tfg_splits"][split] == index.extra["split_rule"]
        keys[split] = {m["properties"]["index"] for m in read_molecules(index, 0)}
    assert all(not keys[a] & keys[b] for a in SPLITS for b in SPLITS if a < b)
    assert {i % 10 for i in keys["flow"]} == {6, 7, 8, 9} and {i % 10 for i in keys["heldout"]} == {0}
    default = qm9_splits(limit=5)
    assert [s.name for s in default] == ["train", "test"] and "tfg_splits" not in default[0].extra


def test_rdkit_finds_qm9_molecules_valid_and_corrupted_geometries_invalid(qm9):
    molecules = [(m["atoms"].numpy(), m["pos"].numpy()) for m in read_molecules(load_index(qm9 / "flow"), 0)]
    checked = [check_molecule(z, p) for z, p in molecules]
    assert all(c.valid and c.stable and c.smiles for c in checked)
    metrics = chemistry_metrics(checked, reference_smiles(molecules))
    assert metrics["validity"] == metrics["molecule_stability"] == metrics["atom_stability"] == 1.0
    assert metrics["novelty"] == 0.0 and 0.5 < metrics["uniqueness"] <= 1.0
    larger = [(z, p) for z, p in molecules if len(z) >= 5]
    assert len(larger) >= 10
    centre = [p.mean(0) for _, p in larger]
    squashed = [check_molecule(z, (p - c) * 0.45 + c) for (z, p), c in zip(larger, centre)]
    stretched = [check_molecule(z, (p - c) * 2.0 + c) for (z, p), c in zip(larger, centre)]
    # squashed: every atom bonds to nearly every other (over-valent); stretched: no bonds at all
    assert chemistry_metrics(squashed)["validity"] <= 0.2 and not any(c.valid for c in stretched)
    assert chemistry_metrics(squashed)["molecule_stability"] <= 0.2


def tiny(qm9, run_dir, *extra):
    return ["run", "tfg_flow", "--preset", "tiny", f"data.path={qm9}/flow", f"data.eval_path={qm9}/heldout",
            f"run.dir={run_dir}", *extra]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_predictors_flow_report_sampling_guidance_and_exact_resume(qm9, tmp_path):
    # one command: the guidance predictor and the oracle are trained first (stages), then the flow
    flow = tmp_path / "flow"
    args = tiny(qm9, flow, "guidance.predictor_stage=tiny_predictor", "guidance.properties=[gap,mu]",
                "guidance.target_offset=1", "guidance.molecules=3")
    done = scaleyard(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    for stage, split in (("predictor", "guide"), ("oracle", "oracle")):
        mae = summary(flow / "stages" / stage)["eval"]
        assert all(np.isfinite(mae[f"test_mae/{p}"]) for p in ("alpha", "gap", "homo", "lumo", "mu", "cv"))
        config = OmegaConf.load(flow / "stages" / stage / "config.yaml")
        assert config.task == "predictor" and config.data.path == f"{qm9}/{split}"
    assert OmegaConf.load(flow / "config.yaml").guidance.oracle_run == str(flow / "stages" / "oracle")
    report = json.loads((flow / "report.json").read_text())
    results = report["results"]
    assert report["context"]["targets"].startswith("molecules 1..3 of") and results[0]["molecules"] == 3
    assert [r["property"] for r in results] == ["gap", "mu"] and "| gap |" in (flow / "report.md").read_text()
    assert all(np.isfinite(r[m]["mae"]) and 0 <= r[m]["validity"] <= 1 for r in results for m in ("guided", "unguided"))
    assert {"validity", "uniqueness", "novelty", "molecule_stability"} <= set(summary(flow)["eval"])

    done = scaleyard("sample", str(flow), "--rows", "5", "--out", str(tmp_path / "mols.csv"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["molecules"] == 5
    assert len((tmp_path / "mols.csv").read_text().splitlines()) == 6

    # guided sampling through the CLI: bad targets are refused before anything is written
    for target, words in (("foo=1", ["'foo'", "gap"]), ("gap=9", ["gap=9", "range"]), ("gap", ["PROPERTY=NUMBER"])):
        done = scaleyard("sample", str(flow), "--rows", "3", "--target", target, "--out", str(tmp_path / "bad.sdf"))
        assert done.returncode != 0 and all(w in done.stderr for w in words), done.stderr
        assert not (tmp_path / "bad.sdf").exists()
    done = scaleyard("sample", str(flow), "--rows", "3", "--target", "gap=0.25", "--out", str(tmp_path / "guided.sdf"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["molecules"] == 3
    assert (tmp_path / "guided.report.md").exists() and (tmp_path / "guided.sdf").exists()

    # exact resume: drop the last checkpoint, run the same command again
    reference = summary(flow)["weights_sha256"]
    shutil.rmtree(flow / "checkpoints" / "step_00000006")
    (flow / "summary.json").unlink()
    done = scaleyard(*args)
    assert done.returncode == 0 and "resumed from" in done.stdout + done.stderr, done.stdout + done.stderr
    assert summary(flow)["weights_sha256"] == reference


def test_bad_config_is_refused_before_anything_is_written(qm9, tmp_path):
    done = scaleyard(*tiny(qm9, tmp_path / "run", "properties=[gap,weight]"))
    assert done.returncode != 0 and "properties" in done.stderr and "weight" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    done = scaleyard(*tiny(qm9, tmp_path / "run", "guidance.predictor_stage=nope"))
    assert done.returncode != 0 and "guidance.predictor_stage" in done.stderr and "tiny_predictor" in done.stderr
    assert not (tmp_path / "run").exists()


def test_per_property_guidance_knobs_override_the_shared_ones_and_bad_names_are_refused():
    from scaleyard.jobs.tfg_flow.job import Config, check_per_property, guidance_config
    from scaleyard.platform.config import ConfigError

    cfg = OmegaConf.structured(Config)
    cfg.guidance.tau = 0.3
    cfg.guidance.per_property = {"gap": {"tau": 0.01, "candidates": 32.0}}
    gap, mu = guidance_config(cfg, "gap"), guidance_config(cfg, "mu")
    assert gap.tau == 0.01 and gap.candidates == 32 and isinstance(gap.candidates, int)
    assert mu.tau == 0.3 and mu.candidates == cfg.guidance.candidates and guidance_config(cfg).tau == 0.3
    for bad, words in (({"weight": {"tau": 1.0}}, ["per_property.weight", "gap"]),
                       ({"gap": {"speed": 1.0}}, ["per_property.gap.speed", "rho"])):
        cfg.guidance.per_property = bad
        with pytest.raises(ConfigError) as err:
            check_per_property(cfg)
        assert all(w in str(err.value) for w in words)
