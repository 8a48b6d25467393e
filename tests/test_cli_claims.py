"""README claims checked through real processes: `scaleyard config` prints the resolved, validated
config as YAML and writes nothing; the pre-flight check names a failing rank and its host.
(Sharded checkpoints resuming at another world size: tests/test_elastic_resume.py.)"""

import os
import re
import socket
import subprocess
import sys

import yaml

from conftest import REPO, scaleyard


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
    # the healthy rank does not hang: it gives up after the timeout, naming the rank that never came
    assert said[0].startswith(f"rank 0 on {host}: pre-flight"), said
    assert re.search(r"\b[Rr]anks? 1\b", said[0]), said

