"""README claims checked through real processes: `scaleyard config` prints the resolved, validated
config as YAML and writes nothing; the pre-flight check names a failing rank and its host; a
sharded (ZeRO) checkpoint refuses to resume on another world size, naming both sizes."""

import os
import socket
import subprocess
import sys

import yaml

from conftest import REPO, scaleyard


def files_under(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_config_prints_resolved_validated_yaml_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "never"
    done = scaleyard("config", "classify", "optim.lr=3e-4", "train.steps=77", f"run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)  # stdout is the YAML and nothing else
    assert cfg["optim"]["lr"] == 3e-4 and cfg["train"]["steps"] == 77  # the overrides
    assert cfg["optim"]["warmup_steps"] == 100 and cfg["train"]["batch_size"] == 64  # the default preset
    assert cfg["engine"]["zero_stage"] == 2 and cfg["model"]["dropout"] == 0.1  # the dataclass defaults
    assert cfg["run"]["dir"] == str(run_dir)
    assert {"run", "train", "optim", "engine", "data", "model", "eval"} <= cfg.keys()
    tiny = yaml.safe_load(scaleyard("config", "classify", "--preset", "tiny", cwd=tmp_path).stdout)
    assert tiny["train"]["steps"] == 12 and tiny["model"]["width"] == 4
    assert tiny["run"]["dir"].startswith("runs/classify/")  # a default run folder is named, not made

    unknown = scaleyard("config", "classify", "optim.lrr=1", f"run.dir={run_dir}", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "unknown config key 'optim.lrr'; keys allowed here: beta1, beta2, eps, lr" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert list(tmp_path.iterdir()) == []  # neither run.dir nor runs/ in the working directory


def test_preflight_names_the_failing_rank_and_its_host(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "engine_jobs" / "preflight_probe.py"), str(tmp_path), "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    said = {r: (tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    host = socket.gethostname()
    assert said[1].startswith(f"rank 1 on {host}: device meta failed its check"), said
    # the healthy rank does not hang: it gives up at the barrier, naming the rank that never came
    assert said[0].startswith(f"rank 0 on {host}: pre-flight barrier failed"), said
    assert "Ranks 1 failed to pass monitoredBarrier" in said[0], said


def test_sharded_checkpoint_refuses_another_world_size(tmp_path, classify_args):
    run_dir = tmp_path / "zero"
    args = ["run", "classify", "--preset", "tiny", *classify_args, "engine.name=deepspeed", "engine.zero_stage=1",
            "train.ckpt_every=0", "eval.max_samples=0", f"run.dir={run_dir}"]
    done = scaleyard(*args, "train.steps=2", "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    assert (checkpoint / "deepspeed").is_dir()
    (run_dir / "summary.json").unlink()  # as if it had stopped at step 2 of 4
    before = files_under(run_dir / "checkpoints")

    refused = scaleyard(*args, "train.steps=4", "--nproc", "1")
    assert refused.returncode != 0
    assert f"{checkpoint} holds deepspeed shards of 2 ranks and this run has 1" in refused.stderr, \
        refused.stderr[-3000:]
    assert "scaleyard export" in refused.stderr  # the way out
    assert files_under(run_dir / "checkpoints") == before and not (run_dir / "summary.json").exists()
