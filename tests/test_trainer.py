"""The Trainer's promises, in-process with the real classify job and real shards."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scaleyard.jobs.classify.job import Classify
from scaleyard.platform.checkpoint import Checkpointer
from scaleyard.platform.distributed import DistEnv
from scaleyard.platform.launch import prepare, write_config
from scaleyard.platform.trainer import NonFiniteLossError, Trainer

from conftest import scaleyard, scaleyard_in_process


def train(job, classify_args, run_dir, *overrides):
    prepared = prepare("classify", [*classify_args, f"run.dir={run_dir}", *overrides], preset="tiny")
    write_config(prepared)
    return Trainer(job, prepared.cfg, DistEnv(), handle_signals=False).run()


class NanAtStep(Classify):
    """classify whose loss turns NaN at a given micro-batch."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def train_step(self, model, batch):
        loss, metrics = super().train_step(model, batch)
        self.calls += 1
        return (loss * math.nan if self.calls == self.bad_call else loss), metrics


def test_nan_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, classify_args):
    with pytest.raises(NonFiniteLossError, match="step 7.*step_00000004"):
        train(NanAtStep(7), classify_args, tmp_path, "train.ckpt_every=4")
    assert [ref.step for ref in Checkpointer(tmp_path / "checkpoints", 5).all()] == [4]
    assert not (tmp_path / "summary.json").exists()


def test_tensorboard_holds_the_metrics(tmp_path, classify_args):
    train(Classify(), classify_args, tmp_path, "train.eval_every=6")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/accuracy", "perf/samples_per_s",
                "perf/data_wait_share", "perf/tflops_per_device", "perf/memory_gb", "eval/accuracy",
                "data/skipped_samples"):
        assert tag in tags, tag
    assert "perf/mfu" not in tags  # no peak FLOPs on CPU: no made-up MFU
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [6, 12]
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr == sorted(lr, reverse=True) and lr[-1] < lr[0]  # cosine decay (the curve: tests/test_optim.py)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, classify_args):
    common = ("model.dropout=0", "train.batch_size=16")
    one = train(Classify(), classify_args, tmp_path / "one", *common)
    two = train(Classify(), classify_args, tmp_path / "two", *common, "train.grad_accum=2")
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    # the same gradients, not only the same updates (Adam and clipping hide a gradient off by a factor)
    norms = []
    for run in ("one", "two"):
        events = EventAccumulator(str(tmp_path / run / "tb"))
        events.Reload()
        norms.append([e.value for e in events.Scalars("train/grad_norm")])
    assert len(norms[0]) == 6 and norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_ema_keep_last_and_summary(tmp_path, classify_args):
    summary = train(Classify(), classify_args, tmp_path, "train.ema_decay=0.9", "train.ckpt_every=3",
                    "train.keep_checkpoints=2")
    steps = [ref.step for ref in Checkpointer(tmp_path / "checkpoints", 2).all()]
    assert steps == [9, 12]
    state = torch.load(tmp_path / "checkpoints" / "step_00000012" / "train_state.pt", weights_only=True)
    ema, model = state["ema"], state["model"]
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[k], model[k]) for k in model)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert {"step", "final_loss", "weights_sha256"} <= summary.keys() and summary["step"] == 12


def test_wall_clock_checkpoints(tmp_path, classify_args):
    assert not torch.are_deterministic_algorithms_enabled()
    train(Classify(), classify_args, tmp_path, "train.ckpt_every=0", "train.ckpt_every_minutes=0.000001",
          "train.keep_checkpoints=100")  # with run.deterministic=true, the default
    assert [ref.step for ref in Checkpointer(tmp_path / "checkpoints", 100).all()] == list(range(1, 13))
    # the process-wide flag is handed back: a run does not change the kernels later code in the process gets
    assert not torch.are_deterministic_algorithms_enabled()


def test_bad_config_errors_and_existing_run_untouched(tmp_path, classify_args):
    run_dir = tmp_path / "run"
    ok = scaleyard("run", "classify", "--preset", "tiny", *classify_args, f"run.dir={run_dir}",
                   "train.steps=4", "train.ckpt_every=2")
    assert ok.returncode == 0, ok.stderr
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cases = {
        "train.precision=fp8": "'train.precision': 'fp8' is not allowed; choose one of fp32, bf16, fp16",
        "train.precision=fp16": "'train.precision': fp16 needs loss scaling, which engine.name=deepspeed",
        "engine.zero_stage=4": "'engine.zero_stage': 4 is above the maximum 3",
        "engine.tp_size=2": "'engine.tp_size': tensor/sequence parallelism needs engine.name=megatron",
        "optim.lrr=1": "unknown config key 'optim.lrr'; keys allowed here: beta1",
        "train.steps=many": "'train.steps'",
        "train.grad_accum=3": "divisible by world size x train.grad_accum",
        "data.lanes=-1": "'data.lanes': -1 is below the minimum 0",
        "model.width=8": "different config (keys model.width)",
        "noequals": "not KEY=VALUE",
    }
    for i, (override, message) in enumerate(cases.items()):
        args = ("run", "classify", "--preset", "tiny", *classify_args, f"run.dir={run_dir}", "train.steps=4",
                "train.ckpt_every=2", override)
        if i == 0:  # one case through a real process, the others through the same entry point in this one
            done = scaleyard(*args)
            code, stderr = done.returncode, done.stderr
        else:
            code, stderr = scaleyard_in_process(*args)
        assert code == 2, (override, stderr)
        assert message in stderr, (override, stderr)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    code, stderr = scaleyard_in_process("run", "classify", f"data.path={tmp_path}/nothing", f"run.dir={tmp_path}/x")
    assert code == 2 and "no shard index" in stderr


class OutputDtypes(Classify):
    """classify recording the dtype of the classifier's logits at every training forward."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        parts.model.register_forward_hook(lambda module, args, out: self.dtypes.append(out.dtype))
        return parts


def test_bf16_autocast_trains(tmp_path, classify_args):
    job = OutputDtypes()
    summary = train(job, classify_args, tmp_path, "train.precision=bf16", "eval.max_samples=0")
    assert math.isfinite(summary["final_loss"]) and summary["step"] == 12
    assert job.dtypes == [torch.bfloat16] * 12  # the forward really ran under bf16 autocast
    state = torch.load(tmp_path / "checkpoints" / "step_00000012" / "train_state.pt", weights_only=True)
    assert {v.dtype for v in state["model"].values()} == {torch.float32}  # the weights stay fp32


def test_classifier_checkpoint_loads_in_other_jobs(tmp_path, classify_args):
    from scaleyard.jobs.classify.job import load_classifier
    from scaleyard.platform.checkpoint import weights_sha256

    summary = train(Classify(), classify_args, tmp_path)
    model = load_classifier(tmp_path)
    assert weights_sha256(model.state_dict()) == summary["weights_sha256"]
    assert model.features(torch.zeros(3, 1, 28, 28)).shape == (3, 16)


def test_too_many_unreadable_samples_stop_the_run(tmp_path, fmnist, classify_args):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fmnist / "train", data)
    for shard in sorted(data.glob("*.tar"))[:3]:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    args = [a for a in classify_args if not a.startswith("data.path=")] + [f"data.path={data}"]
    with pytest.raises(RuntimeError, match="data.max_skip_share=0.01 of samples were unreadable"):
        train(Classify(), args, tmp_path / "run", "train.steps=200")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert events.Scalars("data/skipped_samples")[-1].value > 0


def test_distributed_env_from_torchrun_and_slurm(monkeypatch):
    from scaleyard.platform import distributed
    from scaleyard.platform.distributed import env_from_os

    torchrun = env_from_os({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr) == (3, 8, 1, "n1")
    tasks = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
             "SLURM_JOB_NODELIST": "gpu[003-010,12],cpu1"}
    # the first node of the allocation; here it does not resolve, so the address SLURM records for it
    looked_up = []
    monkeypatch.setattr(distributed.socket, "getaddrinfo", lambda host, port: (_ for _ in ()).throw(OSError(host)))
    monkeypatch.setattr(distributed, "scontrol_node_addr", lambda node: looked_up.append(node) or "10.0.0.3")
    slurm = env_from_os(tasks)
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 16, 1, "10.0.0.3")
    assert slurm.master_port == 20077 and looked_up == ["gpu003"]
    # a profile that pins the rendezvous: nothing is looked up
    pinned = env_from_os({**tasks, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (pinned.master_addr, pinned.master_port) == ("head", 4000) and looked_up == ["gpu003"]
    assert not env_from_os({}).distributed


def test_tensorboard_server_serves_the_run(tmp_path, classify_args):
    """The real TensorBoard server on loopback reads the run's event files."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    train(Classify(), classify_args, tmp_path / "run")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=run/tb&tag=train/loss"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "TensorBoard did not come up"
                time.sleep(0.5)
        assert [step for _, step, _ in points] == [2, 4, 6, 8, 10, 12]
    finally:
        server.terminate()
        server.wait(timeout=30)
