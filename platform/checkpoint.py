"""Checkpoints that survive crashes: written under a temporary name, renamed when complete.

Layout: `<run>/checkpoints/step_00000100/` holds `train_state.pt` (model, optimizer, scheduler,
EMA, job state, data position, step; written by rank 0 for replicated engines), one
`rng_rank<R>.pt` per rank (+ `local_rank<R>.pt`, a rank's own state such as EMA partitions), the
sharded engines' own files (e.g. `deepspeed/`), and `meta.json`, written last, with the size and
sha256 of every other file (platform/checkpoint_integrity.py verifies them before loading).
Only folders named `step_*` with a `meta.json` count; a crash at any point leaves at most a
`.tmp-*` folder, removed at start-up.
Loading uses `torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleyard.platform.checkpoint_integrity import collect_digests, safe_load, write_digests

STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Fault injection for the crash-during-write tests: "SECONDS" or "SECONDS@STEP" to sleep between
# writing a checkpoint's state and publishing it. Never set in normal runs.
PAUSE_ENV = "SCALEYARD_TEST_PAUSE_IN_CHECKPOINT"


def _injected_pause(step: int) -> float:
    seconds, _, at_step = os.environ.get(PAUSE_ENV, "").partition("@")
    if not seconds or (at_step and int(at_step) != step):
        return 0.0
    return float(seconds)


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


def capture_rng() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_has_gauss, "gauss": np_gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class Checkpointer:
    def __init__(self, folder: Path, keep: int, rank: int = 0, world: int = 1):
        self.folder = Path(folder)
        self.keep = keep
        self.rank = rank
        self.world = world

    def all(self) -> list[CheckpointRef]:
        if not self.folder.exists():
            return []
        found = []
        for entry in self.folder.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and (entry / "meta.json").exists():
                found.append(CheckpointRef(int(match.group(1)), entry))
        return sorted(found, key=lambda ref: ref.step)

    def latest(self) -> CheckpointRef | None:
        found = self.all()
        return found[-1] if found else None

    def clean_partial(self) -> None:
        """Remove what a crashed write left behind (rank 0, before anything is written)."""
        if self.rank == 0 and self.folder.exists():
            for entry in self.folder.iterdir():
                if entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry, ignore_errors=True)

    def _tmp(self, step: int) -> Path:
        return self.folder / f".tmp-step_{step:08d}"

    def save(self, step: int, train_state: dict[str, Any] | None, engine, meta: dict[str, Any],
             local_state: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. `train_state` is written by rank 0 only; sharded
        engines write their parts (`engine.save_state`) and `local_state` is written per rank."""
        tmp = self._tmp(step)
        final = self.folder / f"step_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save_state(tmp)
        torch.save(capture_rng(), tmp / f"rng_rank{self.rank}.pt")
        if local_state is not None:
            torch.save(local_state, tmp / f"local_rank{self.rank}.pt")
        if self.rank == 0 and train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        engine.barrier()
        write_digests(tmp, self.rank, self.world)
        engine.barrier()
        if self.rank == 0:
            files = collect_digests(tmp, self.world)
            pause = _injected_pause(step)
            if pause:
                time.sleep(pause)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "files": files}, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. final after periodic)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.folder)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old.path, ignore_errors=True)
        engine.barrier()
        return final

    def load(self, ref: CheckpointRef) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        state = safe_load(ref.path / "train_state.pt", map_location="cpu")
        rng_file = ref.path / f"rng_rank{self.rank}.pt"
        # A rank that did not exist when the checkpoint was written (world size grew) keeps its
        # fresh seed: the data order does not depend on it, only dropout-like randomness does.
        rng = safe_load(rng_file) if rng_file.exists() else None
        local_file = ref.path / f"local_rank{self.rank}.pt"
        local = safe_load(local_file, map_location="cpu") if local_file.exists() else {}
        return state, rng, local


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
