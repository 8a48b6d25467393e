"""Checkpoints that can be trusted: a damaged or tampered newest checkpoint is set aside (never
deleted) and the run resumes from the newest intact one, ending where an undisturbed run ends;
unsafe files are refused everywhere with a message that names them; nothing intact = a clear error."""

import json
import os
import pickle
import shutil

import pytest
import torch
from test_job_contract import PointsJob, train

from scaleyard.platform.checkpoint import Checkpointer
from scaleyard.platform.checkpoint_integrity import CheckpointError, safe_load, verify

from conftest import scaleyard

MARKER = "/tmp/scaleyard-test-tampered-marker"


class Payload:
    """What an attacker would put in a checkpoint: unpickling it runs a shell command."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper(path):
    torch.save({"model": Payload()}, path)


DAMAGE = {"truncated": truncate, "deleted": os.remove, "flipped byte": flip_byte, "malicious pickle": tamper}


@pytest.fixture()
def no_marker():
    if os.path.exists(MARKER):
        os.remove(MARKER)
    yield
    assert not os.path.exists(MARKER), "a tampered checkpoint file ran code"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(tmp_path, damage, no_marker):
    straight = train(PointsJob(), tmp_path / "straight", "train.steps=15")
    run_dir = tmp_path / "damaged"
    train(PointsJob(), run_dir, "train.steps=10", "train.keep_checkpoints=3")  # checkpoints at 5 and 10
    DAMAGE[damage](run_dir / "checkpoints" / "step_00000010" / "train_state.pt")
    resumed = train(PointsJob(), run_dir, "train.steps=15", "train.keep_checkpoints=3")
    assert resumed["weights_sha256"] == straight["weights_sha256"]  # steps 6-15 trained again, exactly
    kept = run_dir / "checkpoints" / "corrupt-step_00000010"
    assert kept.is_dir() and "train_state.pt" in (kept / "SET_ASIDE.txt").read_text()
    record = json.loads((run_dir / "fallbacks.jsonl").read_text().splitlines()[0])
    assert record["checkpoint"] == "step_00000010" and record["resumed_from"] == "step_00000005"
    assert [r.step for r in Checkpointer(run_dir / "checkpoints", 3).all()] == [5, 10, 15]  # 10 written anew


def test_no_intact_checkpoint_is_a_clear_error_that_moves_nothing(tmp_path, no_marker):
    run_dir = tmp_path / "run"
    train(PointsJob(), run_dir, "train.steps=10")
    for step in (5, 10):
        flip_byte(run_dir / "checkpoints" / f"step_{step:08d}" / "train_state.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step_00000010.*sha256.*step_00000005"):
        train(PointsJob(), run_dir, "train.steps=20")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


def test_unsafe_files_are_refused_by_every_loader_without_bad_advice(tmp_path, no_marker):
    run_dir = tmp_path / "run"
    train(PointsJob(), run_dir, "train.steps=10")
    (run_dir / "config.yaml").write_text("job: points\n")
    state = run_dir / "checkpoints" / "step_00000010" / "train_state.pt"
    tamper(state)
    with pytest.raises(CheckpointError) as refused:
        safe_load(state)
    assert "tampered" in str(refused.value) and "weights_only" not in str(refused.value)
    problems = verify(state.parent)
    assert any(p.startswith("train_state.pt has") or "sha256" in p for p in problems)  # not what was written
    assert any("posix.system" in p for p in problems)  # and it would run a shell command
    export = scaleyard("export", str(run_dir), "--step", "10", "--out", str(tmp_path / "w.safetensors"))
    assert export.returncode == 2 and "tampered" in export.stderr and "weights_only" not in export.stderr
    assert not (tmp_path / "w.safetensors").exists()
    # a raw (non-zip) pickle where a checkpoint file should be is refused the same way
    with open(state, "wb") as handle:
        pickle.dump(Payload(), handle)
    assert any("not a torch.save archive" in p for p in verify(state.parent))
    with pytest.raises(CheckpointError, match="tampered"):
        safe_load(state)


def test_digests_are_recorded_for_every_file(tmp_path):
    run_dir = tmp_path / "run"
    train(PointsJob(), run_dir, "train.steps=5")
    folder = run_dir / "checkpoints" / "step_00000005"
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"train_state.pt", "rng_rank0.pt"}
    assert verify(folder) == []
    shutil.copy(folder / "rng_rank0.pt", folder / "train_state.pt")
    assert "train_state.pt has" in verify(folder)[0]


@pytest.mark.slow
def test_tampered_deepspeed_file_never_reaches_deepspeed(fmnist, tmp_path, no_marker):
    """DeepSpeed loads its own files with weights_only=False: a tampered optimizer file in the
    newest checkpoint would run code on resume. The scan refuses it first; 2 ranks agree to fall
    back to the previous checkpoint."""
    pytest.importorskip("deepspeed")
    from test_engines_deepspeed import t2i_args

    run_dir = tmp_path / "run"
    engine = ["engine.name=deepspeed", "engine.zero_stage=2", "optim.schedule=constant"]
    first = scaleyard(*t2i_args(fmnist, run_dir, *engine, "train.steps=8"))
    assert first.returncode == 0, first.stderr[-3000:]
    optim_file = sorted((run_dir / "checkpoints" / "step_00000008" / "deepspeed").rglob("*optim_states.pt"))[0]
    tamper(optim_file)
    resumed = scaleyard(*t2i_args(fmnist, run_dir, *engine, "train.steps=12"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "tampered" in log and "resumed from" in log and "step_00000004" in log
    assert (run_dir / "checkpoints" / "corrupt-step_00000008").is_dir()
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 12


def test_status_shows_a_run_that_fell_back(tmp_path):
    run_dir = tmp_path / "run"
    train(PointsJob(), run_dir, "train.steps=10")
    (run_dir / "config.yaml").write_text("job: points\n")
    flip_byte(run_dir / "checkpoints" / "step_00000010" / "rng_rank0.pt")
    train(PointsJob(), run_dir, "train.steps=12")
    rows = json.loads(scaleyard("status", str(run_dir), "--json").stdout)
    assert rows[0]["fallbacks"][0]["resumed_from"] == "step_00000005"
    table = scaleyard("status", str(run_dir)).stdout
    assert "fell back: step_00000010 set aside, resumed from step_00000005" in table
