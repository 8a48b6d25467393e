"""`scaleyard export` on single-process and 2-rank DDP runs through the real CLI: the file's
weights hash to summary.json's `weights_sha256` and load strictly into the job's model;
`--step N` picks that checkpoint; a missing step is a clear error that writes nothing."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scaleyard.models.classifier import ClassifierConfig, ConvClassifier
from scaleyard.platform.checkpoint import weights_sha256

from conftest import scaleyard


def classify_run(classify_args, run_dir, *extra):
    done = scaleyard("run", "classify", "--preset", "tiny", *classify_args, "train.ckpt_every=4",
                     "train.keep_checkpoints=5", "train.eval_every=0", "eval.max_samples=0", f"run.dir={run_dir}",
                     *extra)
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[-10:]) + done.stderr[-2000:]
    return run_dir


def train_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "train_state.pt", weights_only=True)


def strict_model(run_dir, weights):
    """The classifier rebuilt from the run's own record of its architecture, loading strictly."""
    model = ConvClassifier(ClassifierConfig(**train_state(run_dir, 12)["job"]["model_config"]))
    model.load_state_dict(weights, strict=True)
    return model


def check_export(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    done = scaleyard("export", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    path = run_dir / "export" / "step_00000012.safetensors"
    weights = load_file(path)
    assert weights_sha256(weights) == summary["weights_sha256"]
    assert f"weights sha256 {summary['weights_sha256']}" in done.stdout
    assert all(v.dtype == torch.float32 for v in weights.values())
    model = strict_model(run_dir, weights)
    assert weights_sha256(model.state_dict()) == summary["weights_sha256"]
    return summary


@pytest.mark.slow  # CI budget: ZeRO-3 and TP=2 exports are checked in the default tier (engine tests)
def test_ddp_export_matches_summary_and_loads(fmnist, tmp_path, classify_args):
    run_dir = classify_run(classify_args, tmp_path / "ddp", "--nproc", "2", "train.ckpt_every=0")
    summary = check_export(run_dir)
    assert summary["world_size"] == 2
    # DDP's wrapper never leaks into the names ("module." would fail the strict load above)
    assert not any(k.startswith("module.") for k in load_file(run_dir / "export" / "step_00000012.safetensors"))


def test_single_process_export_and_step_choice(tmp_path, classify_args):
    single_run = classify_run(classify_args, tmp_path / "single")
    assert check_export(single_run)["world_size"] == 1

    out = tmp_path / "eight.safetensors"
    done = scaleyard("export", str(single_run), "--step", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    weights = load_file(out)
    at_eight, at_twelve = train_state(single_run, 8)["model"], train_state(single_run, 12)["model"]
    assert weights.keys() == at_eight.keys()
    assert all(torch.equal(weights[k], at_eight[k]) for k in weights)
    assert any(not torch.equal(weights[k], at_twelve[k]) for k in weights)  # not the latest
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["step"] == "8"
    strict_model(single_run, weights)

    exported_before = sorted(p.name for p in (single_run / "export").glob("*"))
    missing = scaleyard("export", str(single_run), "--step", "5")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "has no checkpoint at step 5; steps: 4, 8, 12" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert sorted(p.name for p in (single_run / "export").glob("*")) == exported_before == ["step_00000012.safetensors"]
