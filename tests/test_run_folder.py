"""What a run folder promises through the real CLI: a start that failed can be fixed in place, a
restart before the first checkpoint leaves no duplicate TensorBoard steps, a finished run continues
to more steps, and the reader lanes suit any world size (recorded, with a clear resume error)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scaleyard.platform.checkpoint import PAUSE_ENV

from conftest import REPO, scaleyard


def run(classify_args, run_dir, *extra):
    return scaleyard("run", "classify", "--preset", "tiny", *classify_args, "train.log_every=2",
                     f"run.dir={run_dir}", *extra)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_failed_start_can_be_fixed_in_the_same_folder(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    wrong = [a for a in classify_args if not a.startswith("data.path=")] + [f"data.path={tmp_path}/nowhere"]
    failed = run(wrong, run_dir, "train.steps=4")
    assert failed.returncode != 0 and "nowhere" in failed.stderr
    assert (run_dir / "config.yaml").exists()  # the failed start wrote its config ...
    fixed = run(classify_args, run_dir, "train.steps=4")  # ... which does not lock the folder
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "new run" in fixed.stdout
    assert summary(run_dir)["step"] == 4


def test_restart_before_the_first_checkpoint_leaves_no_duplicate_steps(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    args = ["run", "classify", "--preset", "tiny", *classify_args, "train.steps=20", "train.log_every=1",
            "train.ckpt_every=0", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "60@20"}
    process = subprocess.Popen([sys.executable, "-m", "scaleyard.platform.cli", *args], env=env, cwd=REPO,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / ".tmp-step_00000020" / "train_state.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # every step logged, no checkpoint published
    process.wait()
    again = scaleyard(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "new run" in again.stdout
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 21))


@pytest.mark.slow  # CI budget
def test_a_finished_run_continues_to_more_steps(tmp_path, classify_args):
    constant = ["optim.schedule=constant", "train.ckpt_every=0"]
    straight = run(classify_args, tmp_path / "straight", "train.steps=16", *constant)
    assert straight.returncode == 0, straight.stderr[-2000:]
    extended = tmp_path / "extended"
    assert run(classify_args, extended, "train.steps=8", *constant).returncode == 0
    more = run(classify_args, extended, "train.steps=16", *constant)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "continuing to more steps" in more.stdout and "optim.schedule=constant" in more.stderr
    assert summary(extended)["step"] == 16
    assert json.loads((extended / "summary.step_00000008.json").read_text())["step"] == 8
    assert summary(extended)["weights_sha256"] == summary(tmp_path / "straight")["weights_sha256"]
    # with a decaying schedule the same request says plainly that it is a different run
    cosine = tmp_path / "cosine"
    assert run(classify_args, cosine, "train.steps=4", "train.ckpt_every=0").returncode == 0
    notice = run(classify_args, cosine, "train.steps=6", "train.ckpt_every=0")
    assert notice.returncode == 0 and "NOT the run you would get" in notice.stderr
    # asking for fewer steps than were trained is not a continuation
    assert "already finished" in run(classify_args, cosine, "train.steps=5", "train.ckpt_every=0").stdout


def test_auto_lanes_fit_any_world_size_and_are_recorded(tmp_path, classify_args):
    def lanes(*extra):
        out = scaleyard("config", "classify", *extra)
        assert out.returncode == 0, out.stderr
        return yaml.safe_load(out.stdout)["data"]["lanes"]

    assert lanes() == 16
    # 32 = the shipped example-gpu profile (4 nodes x 8 GPUs), which the old fixed 16 lanes refused
    assert lanes("--nproc", "24", "train.batch_size=96") == 48 and lanes("--nproc", "32") == 32
    # a run records the lanes it chose; resuming on a world size that does not divide them says which do
    args = [a for a in classify_args if not a.startswith("data.lanes")] + ["data.lanes=0"]  # the preset sets 4
    run_dir = tmp_path / "run"
    assert run(args, run_dir, "train.steps=2").returncode == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["lanes"] == 16
    refused = scaleyard("config", "classify", "--nproc", "3", *args, "train.batch_size=48", f"run.dir={run_dir}")
    assert refused.returncode == 2
    assert "'data.lanes': 16" in refused.stderr and "world sizes 1, 2, 4, 8, 16" in refused.stderr


def test_config_output_is_yaml_even_when_deepspeed_warns(tmp_path):
    out = scaleyard("config", "classify", "engine.name=deepspeed")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["engine"]["name"] == "deepspeed"
