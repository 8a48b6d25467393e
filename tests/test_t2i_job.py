"""The t2i job end to end (real shards, real classifier metrics), its resume, and sweeps."""

import dataclasses
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import kill_while_writing

from conftest import scaleyard


@pytest.fixture(scope="module")
def classifier(fmnist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("classifier")
    done = scaleyard("run", "classify", "--preset", "tiny", f"data.path={fmnist}/train",
                     f"data.eval_path={fmnist}/test", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir


def t2i_args(fmnist, run_dir, *extra):
    return ["run", "t2i", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            f"run.dir={run_dir}", *extra]


def test_t2i_trains_evaluates_and_logs_samples(tmp_path, fmnist, classifier):
    done = scaleyard(*t2i_args(fmnist, tmp_path, f"eval.classifier={classifier}", "train.ema_decay=0.99"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = summary["eval"]
    assert {"loss", "loss_t0.1", "loss_t0.9", "frechet_distance", "caption_accuracy"} <= metrics.keys()
    assert metrics["frechet_distance"] > 0 and 0 <= metrics["caption_accuracy"] <= 1
    assert summary["params"] < summary["compute_flops"] and summary["samples_seen"] == 8 * 16
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "eval/samples" in events.Tags()["images"]
    assert "perf/tflops_per_device" in events.Tags()["scalars"]


# CI budget: slow tier; by default, exact resume of a t2i run after SIGKILL is checked under ZeRO-3
# in test_engines_deepspeed.py
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dit_adaln", "dit_cross"])
def test_t2i_resume_is_exact(tmp_path, fmnist, arch):
    extra = [f"model.preset={arch}-cpu-xs", "eval.samples=0", "train.steps=12", "train.ckpt_every=4"]
    reference = scaleyard(*t2i_args(fmnist, tmp_path / "ref", *extra))
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *t2i_args(fmnist, run_dir, *extra)]
    kill_while_writing(command, run_dir / "checkpoints", 12)
    resumed = scaleyard(*t2i_args(fmnist, run_dir, *extra))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    first, second = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "ref", run_dir))
    assert first["weights_sha256"] == second["weights_sha256"]


def test_t2i_bad_inputs(tmp_path, fmnist):
    unknown = scaleyard(*t2i_args(fmnist, tmp_path / "a", "model.preset=uvit-huge"))
    assert unknown.returncode == 2 and "known presets: dit_adaln-cpu-xs" in unknown.stderr
    wrong_size = scaleyard(*t2i_args(fmnist, tmp_path / "b", "model.preset=uvit-0.3B"))
    assert wrong_size.returncode == 2 and "expects 4x32 inputs" in wrong_size.stderr
    assert "set model.channels=1 model.image_size=28" in wrong_size.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()


def write_spec(path, fmnist, body):
    base = [f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test", "train.batch_size=16", "eval.samples=0"]
    path.write_text(json.dumps({"job": "t2i", "preset": "tiny", "base": base, **body}))  # JSON is YAML
    return path


def test_isoflop_sweep_runs_resumes_and_fits(tmp_path, fmnist):
    spec = write_spec(tmp_path / "ladder.yaml", fmnist, {
        "isoflop": {"values": ["uvit-cpu-xs", "dit_cross-cpu-xs"], "budgets": [6e9, 1.2e10]}, "concurrency": 2})
    sweep_dir = tmp_path / "sweep"
    done = scaleyard("sweep", str(spec), "--dir", str(sweep_dir), "--wait", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert len(manifest["runs"]) == 4
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    assert len(summaries) == 4
    for summary in summaries:  # steps come from the budget: compute lands within one step of it
        budget = 6e9 if summary["compute_flops"] < 9e9 else 1.2e10
        assert budget - summary["compute_flops"] < summary["compute_flops"] / summary["step"]
    again = scaleyard("sweep", str(spec), "--dir", str(sweep_dir))
    assert again.returncode == 0 and "submitted 0, skipped 4" in again.stdout
    rows = json.loads(scaleyard("status", str(sweep_dir), "--json").stdout)
    assert len(rows) == 4 and all(r["state"] == "COMPLETED" for r in rows)


def test_sweep_specs_are_checked_before_queueing(tmp_path, fmnist):
    no_axes = write_spec(tmp_path / "a.yaml", fmnist, {})
    done = scaleyard("sweep", str(no_axes), "--dir", str(tmp_path / "a"))
    assert done.returncode == 2 and "has no axes" in done.stderr
    tiny_budget = write_spec(tmp_path / "b.yaml", fmnist, {"isoflop": {"values": ["uvit-cpu-s"], "budgets": [1e6]}})
    done = scaleyard("sweep", str(tiny_budget), "--dir", str(tmp_path / "b"))
    assert done.returncode == 2 and "too small for one step of model.preset=uvit-cpu-s" in done.stderr
    bad_value = write_spec(tmp_path / "c.yaml", fmnist, {"grid": {"optim.lr": ["fast"]}})
    done = scaleyard("sweep", str(bad_value), "--dir", str(tmp_path / "c"))
    assert done.returncode == 2 and "'optim.lr'" in done.stderr
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_frozen_minilm_text_encoder(tmp_path, fmnist):
    import torch

    done = scaleyard(*t2i_args(fmnist, tmp_path, "model.text_encoder=minilm", "eval.samples=8", "train.ema_decay=0.9"))
    assert done.returncode == 0, done.stdout + done.stderr
    state = torch.load(tmp_path / "checkpoints" / "step_00000008" / "train_state.pt", weights_only=True)
    assert state["model"]["denoiser.text_proj.weight"].shape[1] == 384  # MiniLM's token width
    assert not any(key.startswith(("text.", "frozen")) for key in state["model"])  # package weights not saved
    assert state["ema"].keys() == state["model"].keys()


@pytest.mark.slow  # CI budget: PPD's tiny path trains a t2i base on shapes in the default tier
def test_t2i_on_shapes_with_its_own_geometry(tmp_path):
    from scaleyard.data_loaders.builders import build

    build("shapes", tmp_path / "shapes", shard_size=50, limit=100, resolution=32)
    data = [f"data.path={tmp_path}/shapes/train", f"data.eval_path={tmp_path}/shapes/test", "eval.samples=8"]
    mismatch = scaleyard("run", "t2i", "--preset", "tiny", *data, f"run.dir={tmp_path}/a")
    assert mismatch.returncode == 2 and "set model.channels=3 model.image_size=32" in mismatch.stderr
    bad_patch = scaleyard("run", "t2i", "--preset", "tiny", *data, "model.image_size=30", f"run.dir={tmp_path}/b")
    assert bad_patch.returncode == 2 and "not divisible by the patch size" in bad_patch.stderr
    done = scaleyard("run", "t2i", "--preset", "tiny", *data, "model.channels=3", "model.image_size=32",
                     f"run.dir={tmp_path}/c", "--nproc", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["world_size"] == 2


def test_a_run_saved_before_the_architecture_defaults_changed_resumes_as_it_was(tmp_path):
    """config.yaml written before model.qk_norm / cross_norm / conv_out / qkv_bias / time_mlp
    existed: that run had query/key norm, the cross-attention norm, U-ViT's qkv bias and time MLP,
    and no U-ViT output conv. It resumes as that model (a key set otherwise on the command line is
    refused, naming the value it was trained with), and its config reads as that model wherever a
    saved run is loaded (ppd's base model), so its weights load strictly."""
    from omegaconf import OmegaConf

    from scaleyard.jobs.ppd.sources import base_config
    from scaleyard.jobs.t2i.job import model_configs
    from scaleyard.models.diffusion.transformer import SAVED_BEFORE, build_model
    from scaleyard.platform.config import ConfigError
    from scaleyard.platform.launch import check_run_dir, prepare, write_config

    run_dir = tmp_path / "old"
    args = t2i_args(tmp_path / "data", run_dir, "model.preset=uvit-cpu-xs")[4:]  # checks only: no data read
    write_config(prepare("t2i", args, preset="tiny"))
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "meta.json").write_text("{}")
    saved = OmegaConf.load(run_dir / "config.yaml")
    for key in ("qk_norm", "cross_norm", "conv_out", "qkv_bias", "time_mlp"):
        del saved.model[key]
    OmegaConf.save(saved, run_dir / "config.yaml")
    old = ["model.qk_norm=true", "model.cross_norm=true", "model.conv_out=false", "model.qkv_bias=true",
           "model.time_mlp=true"]
    resumed = prepare("t2i", args, preset="tiny")
    assert check_run_dir(resumed) == "resume"  # as it was trained, without a word from the user
    assert set(old) <= set(resumed.overrides)  # child processes and requeued jobs see the same model
    assert resumed.cfg.model.qk_norm and not resumed.cfg.model.conv_out
    with pytest.raises(ConfigError, match=r"keys model.qk_norm\).*trained with model.qk_norm=true"):
        check_run_dir(prepare("t2i", [*args, "model.qk_norm=false"], preset="tiny"))  # asked for another model
    assert check_run_dir(prepare("t2i", [*args, *old], preset="tiny")) == "resume"
    fresh = prepare("t2i", t2i_args(tmp_path / "data", tmp_path / "new", "model.preset=uvit-cpu-xs")[4:],
                    preset="tiny")
    assert not fresh.cfg.model.qk_norm and fresh.cfg.model.conv_out  # a new run: the reference defaults
    denoiser, _ = model_configs(base_config(run_dir))
    assert denoiser.qk_norm and denoiser.cross_norm and not denoiser.conv_out and denoiser.qkv_bias
    model = build_model(denoiser)  # the old checkpoint's keys: no conv, a qkv bias and a time MLP
    assert model.conv is None and model.time.mlp is not None and model.mid_block.attn.qkv.bias is not None
    before = dataclasses.replace(denoiser, **SAVED_BEFORE)  # the architecture as it was before the switches
    old_weights = build_model(before).state_dict()
    model.load_state_dict(old_weights)  # strict: the old weights fit exactly
    with pytest.raises(RuntimeError, match="Missing key.*conv|Unexpected key.*qkv.bias"):  # today's defaults would not
        build_model(dataclasses.replace(before, **{k: not v for k, v in SAVED_BEFORE.items()})).load_state_dict(
            old_weights)
