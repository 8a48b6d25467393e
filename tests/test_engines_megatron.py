"""megatron-core tensor parallelism on gloo ranks (real megatron-core parallel layers) applied
from declared plans: DiT-adaLN / DiT-cross / U-ViT and a Hugging Face Llama compute what the
single-device model computes, a TP=2 training run follows the single-process run (loss and
gradient norm), resumes exactly after SIGKILL and exports single-device weights; impossible
settings and plans are refused before anything runs."""

import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_engines_deepspeed import losses, summary
from test_resume import kill_while_writing

from scaleyard.jobs.t2i.job import Config, TextToImage, model_configs
from scaleyard.platform.checkpoint import weights_sha256
from scaleyard.platform.config import ConfigError, resolve
from scaleyard.platform.engines.tensor_parallel import parse_plan

from conftest import REPO, assert_sampling_uses, scaleyard, scaleyard_in_process

pytest.importorskip("megatron.core")


def test_parallel_blocks_match_single_device_outputs_and_gradients(tmp_path):
    out = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "engine_jobs" / "tensor_parallel_probe.py"), str(out), "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"dit_adaln", "dit_cross", "uvit", "llama", "llama_tied"}
    for arch, r in report.items():
        assert r["output"] <= 1e-5 * max(1.0, r["output_scale"]), (arch, r)
        assert r["input_grad"] < 1e-7 and r["weight_grad"] < 1e-6, (arch, r)
        assert r["grad_scale"] > 1e-3, (arch, r)  # gradients large enough for the comparison to mean something
        assert r["split_parameters"] > 0 and r["marked_split"], (arch, r)  # the gradient norm counts slices
        assert 0.5 < r["local_share"] < 0.65, (arch, r)  # the block matmuls hold most weights; halved
    assert report["llama_tied"]["tied"]  # embedding and logits still share one (split) parameter


def grad_norms(run_dir) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/grad_norm")]


def t2i_args(fmnist, run_dir, nproc, *extra):
    return ["run", "t2i", "--preset", "tiny", f"data.path={fmnist}/train", f"data.eval_path={fmnist}/test",
            "model.preset=dit_adaln-cpu-xs", "train.steps=12", "train.ckpt_every=4", "train.log_every=1",
            "eval.samples=0", "eval.val_samples=32", "train.ema_decay=0.9", f"run.dir={run_dir}",
            "--nproc", str(nproc), *extra]


def test_tp2_training_follows_single_process_resumes_exactly_and_exports(fmnist, tmp_path):
    single = tmp_path / "single"
    done = scaleyard(*t2i_args(fmnist, single, 1, "engine.name=single"))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "tp2"
    engine = ["engine.name=megatron", "engine.tp_size=2"]
    done = scaleyard(*t2i_args(fmnist, reference, 2, *engine))
    assert done.returncode == 0, done.stderr[-3000:]
    # same batches, same noise (both TP ranks draw like the single process); only the order of
    # floating-point sums differs, which Adam's normalised steps carry forward
    diffs = [abs(a - b) for a, b in zip(losses(reference), losses(single))]
    assert len(diffs) == 12 and diffs[0] < 1e-6 and max(diffs) < 2e-3, diffs
    # the norm sums every rank's slices of the split weights once (what clipping scales by)
    first_tp, first_single = grad_norms(reference)[0], grad_norms(single)[0]
    assert abs(first_tp - first_single) < 1e-4 * first_single, (first_tp, first_single)
    assert sorted(p.name for p in (reference / "checkpoints" / "step_00000012" / "megatron").iterdir()) == \
        ["tp_rank0.pt", "tp_rank1.pt"]

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "scaleyard.platform.cli", *t2i_args(fmnist, interrupted, 2, *engine)]
    kill_while_writing(command, interrupted / "checkpoints", 8)
    resumed = scaleyard(*t2i_args(fmnist, interrupted, 2, *engine))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert summary(interrupted)["weights_sha256"] == summary(reference)["weights_sha256"]

    exported = scaleyard("export", str(reference))
    assert exported.returncode == 0, exported.stderr[-2000:]
    weights = load_file(reference / "export" / "step_00000012.safetensors")
    assert weights_sha256(weights) == summary(reference)["weights_sha256"]
    # single-device names and shapes: the export loads strictly into the unparallelized model
    cfg = resolve(Config, [], ["model.preset=dit_adaln-cpu-xs"])
    TextToImage(*model_configs(cfg)).load_state_dict(weights)
    assert_sampling_uses(reference, weights, tmp_path / "samples", "ema=false")  # from the TP shards


@pytest.mark.slow  # TP2 x DP2 across two nodes runs in tests/test_multinode.py (slow) as well
def test_tp2_by_dp2_on_four_ranks_matches_ddp(fmnist, tmp_path):
    """Two replicas of two tensor-parallel ranks: data (and noise) split over replicas only, so
    the curve is DDP's on two ranks."""
    curves = []
    for nproc, engine in ((2, ["engine.name=ddp"]), (4, ["engine.name=megatron", "engine.tp_size=2"])):
        run_dir = tmp_path / f"n{nproc}"
        done = scaleyard(*t2i_args(fmnist, run_dir, nproc, *engine, "train.steps=4", "train.ckpt_every=0"),
                         timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        curves.append(losses(run_dir))
    assert summary(run_dir)["world_size"] == 4
    assert max(abs(a - b) for a, b in zip(*curves)) < 2e-3, curves


@pytest.mark.parametrize("extra,message", [
    (["engine.tp_size=2", "model.text_heads=1"], "'engine.tp_size': 2 does not divide the 1 attention heads"),
    (["engine.tp_size=3", "model.preset=dit_adaln-cpu-m"], "'engine.tp_size': 3 does not divide the world size 2"),
    (["engine.tp_size=2", "engine.sequence_parallel=true"], "'engine.sequence_parallel'"),
])
def test_impossible_tensor_parallel_settings_refused(fmnist, tmp_path, extra, message):
    run_dir = tmp_path / "never"
    code, stderr = scaleyard_in_process(*t2i_args(fmnist, run_dir, 2, "engine.name=megatron", *extra))
    assert code == 2, stderr[-2000:]
    assert message in stderr
    assert not run_dir.exists()


def test_job_without_tensor_parallel_plan_is_refused_before_anything_is_written(classify_args, tmp_path):
    run_dir = tmp_path / "c"
    done = scaleyard("run", "classify", "--preset", "tiny", *classify_args, f"run.dir={run_dir}",
                     "engine.name=megatron", "engine.tp_size=2", "--nproc", "2")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "config key 'engine.name': job classify's model has no tensor-parallel plan" in done.stderr
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("plan,message", [
    ({"modules": {"*.qkv": "sequence_parallel"}}, "style 'sequence_parallel' is not supported"),
    ({"modules": {"embed": "embedding_colwise"}}, "style 'embedding_colwise' is not supported"),
    ({"modules": {"*.qkv": "columnwise"}}, "unknown style 'columnwise'; supported: colwise"),
    ({"modules": {"*.proj": {"style": "rowwise", "parts": 2}}}, "apply to colwise layers only"),
    ({"modules": {"*.qkv": {"style": "colwise", "fused": 3}}}, "unknown options ['fused']"),
    ({"modules": {"*.qkv": "colwise"}, "heads": 4}, "unknown plan keys ['heads']"),
    ({"*.qkv": "colwise"}, "a tensor-parallel plan is a dict with 'modules'"),
])
def test_malformed_plans_are_refused_by_name(plan, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_plan(plan)


def test_plan_numbers_must_split_over_tp_size():
    plan = parse_plan({"modules": {"*.qkv": "colwise"}, "divisible": {"key/value heads": 2}})
    plan.check(2)
    with pytest.raises(ConfigError, match=re.escape("'engine.tp_size': 4 does not divide the 2 key/value heads")):
        plan.check(4)
