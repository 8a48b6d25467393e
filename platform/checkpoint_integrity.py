"""Checkpoints that can be trusted: a digest of every file, verified before loading, and a refusal
of files that hold anything but tensors and plain containers.

- Saving: after every rank has written its files, rank r hashes the files i with i % world == r
  (so a 512-rank checkpoint is hashed 512 ways in parallel) into `digests_rank<r>.json`; rank 0
  merges them into `meta.json` ("files": size and sha256 per file, by path inside the folder).
- Loading: the same split verifies sizes and digests, and scans every `.pt` file's pickle for the
  globals it would import (torch's `get_unsafe_globals_in_checkpoint`, which executes nothing).
  That scan matters beyond `weights_only`: DeepSpeed loads its own files with weights_only=False,
  so a tampered file there would run code on resume; here it is refused before DeepSpeed sees it.
- A checkpoint that fails is set aside (renamed `corrupt-step_*`, never deleted) once an older
  intact one is found; the run resumes from that one (platform/trainer.py).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from scaleyard.platform.run_record import FALLBACKS

META = "meta.json"
DIGESTS = "digests_rank{rank}.json"
SET_ASIDE_PREFIX = "corrupt-"
# Classes DeepSpeed 0.19 pickles into its optimizer files (ZeRO 1-3): an int enum, a plain
# loss-scale record and a (start, numel) dataclass; none runs code when rebuilt. Anything else
# outside torch's weights-only allowlist is refused (a newer DeepSpeed that pickles another class
# shows up here as a refusal naming that class, to be reviewed and added).
ALLOWED_GLOBALS = frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum",
                             "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                             "deepspeed.utils.tensor_fragment.fragment_address"})
TAMPERED = ("it holds objects other than tensors and plain containers, so it may have been tampered with; "
            "nothing in it was run. Delete it or set it aside; scaleyard never loads such files")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or unsafe; the message names it and what to do."""


def safe_load(path: Path, **kwargs: Any) -> Any:
    """`torch.load` of tensors and plain containers only, with an error that names the file and
    never suggests turning `weights_only` off."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: {TAMPERED}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} cannot be read ({first}): the file is damaged or incomplete") from None


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its own bookkeeping, by path inside it, sorted."""
    skip = {META}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in skip and not p.name.startswith("digests_rank"))


def file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def write_digests(folder: Path, rank: int, world: int) -> None:
    """This rank's share of the digests (every rank calls it once all files are written)."""
    mine = checkpoint_files(folder)[rank::world]
    (folder / DIGESTS.format(rank=rank)).write_text(json.dumps({name: file_digest(folder / name) for name in mine}))


def collect_digests(folder: Path, world: int) -> dict[str, Any]:
    """Rank 0, after a barrier: every rank's share, merged (the share files are removed)."""
    merged: dict[str, Any] = {}
    for rank in range(world):
        share = folder / DIGESTS.format(rank=rank)
        merged.update(json.loads(share.read_text()))
        share.unlink()
    return merged


def unsafe_globals(path: Path) -> list[str]:
    """Globals a `.pt` file's pickle would import beyond the weights-only allowlist (and ours)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - not a torch.save file at all: unreadable is unsafe
        return [f"<not a torch.save archive: {type(err).__name__}>"]
    return sorted(set(found) - ALLOWED_GLOBALS)


def verify(folder: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found in this rank's share of a checkpoint (all of it for rank 0 of 1); [] = intact.
    A checkpoint written before digests were recorded is checked for unsafe files only."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        return [f"{META} unreadable ({type(err).__name__})"]
    recorded: dict[str, Any] = meta.get("files", {})
    problems = []
    for name in sorted(recorded)[rank::world]:
        path = folder / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != recorded[name]["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {recorded[name]['size']} were written")
        elif file_digest(path)["sha256"] != recorded[name]["sha256"]:
            problems.append(f"{name} differs from what was written (sha256 mismatch)")
    for name in checkpoint_files(folder)[rank::world]:
        if name.endswith(".pt") and (folder / name).exists():
            bad = unsafe_globals(folder / name)
            if bad:
                problems.append(f"{name}: {TAMPERED} (it would import {', '.join(bad[:3])})")
    return problems


def set_aside(folder: Path, reason: str, resumed_from: Path | None) -> Path:
    """Rename a failed checkpoint out of the way (never delete: a person may want to look) and
    record it in the run folder for `scaleyard status`."""
    target = folder.with_name(f"{SET_ASIDE_PREFIX}{folder.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder.with_name(f"{SET_ASIDE_PREFIX}{folder.name}.{suffix}")
    folder.rename(target)
    (target / "SET_ASIDE.txt").write_text(reason + "\n")
    record = {"time": time.time(), "checkpoint": folder.name, "set_aside_as": target.name, "reason": reason,
              "resumed_from": resumed_from.name if resumed_from else None}
    run_dir = folder.parent.parent
    with open(run_dir / FALLBACKS, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return target
