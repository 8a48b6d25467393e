"""Loading a run's trained weights, whatever engine wrote them: the one function behind
`scaleyard sample`, `scaleyard export`, a fine-tune's base model and feature networks of metrics.

A checkpoint's `train_state.pt` (written by rank 0 for every engine) holds the job state and the
resolved config; the weights are there for single/ddp and in the engine's own files for
deepspeed/megatron. `platform/export.py` knows each layout; this module picks the checkpoint and
returns full single-device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from scaleyard.platform.checkpoint_integrity import safe_load
from scaleyard.platform.export import ExportError, find_checkpoint, full_weights


@dataclass
class RunWeights:
    run_dir: Path
    step: int
    weights: dict[str, torch.Tensor]  # full, single-device state dict of the trained module
    ema: bool  # True when `weights` are the EMA weights
    job_state: dict[str, Any]  # what the job's state_dict() saved (e.g. its model config)
    config: DictConfig  # the run's resolved config as it was saved with the checkpoint


def has_ema(checkpoint: Path) -> bool:
    # mmap: only the EMA entry is read, not the whole (possibly optimizer-sized) file
    state = safe_load(checkpoint / "train_state.pt", map_location="cpu", mmap=True)
    if state.get("ema"):
        return True
    local = checkpoint / "local_rank0.pt"  # ZeRO-3 / tensor parallel: the EMA is kept per rank
    return local.exists() and bool(safe_load(local, map_location="cpu", mmap=True).get("ema"))


def load_run_weights(run_dir: str | Path, step: int | None = None, ema: bool | None = None) -> RunWeights:
    """The weights of a run's checkpoint (`step`, default the newest complete one). `ema=None`
    takes the EMA weights when the run kept them, else the trained ones; True insists on EMA."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").exists():
        raise FileNotFoundError(f"{run_dir} is not a trained run (it has no checkpoints/ folder); give a run folder "
                                "written by `scaleyard run` or `scaleyard submit`")
    ref = find_checkpoint(run_dir, step)
    use_ema = has_ema(ref.path) if ema is None else ema
    try:
        weights = full_weights(ref, ema=use_ema)
    except ExportError as err:
        raise FileNotFoundError(str(err)) from None
    state = safe_load(ref.path / "train_state.pt", map_location="cpu", mmap=True)
    config = OmegaConf.create(state["config"]) if state.get("config") else OmegaConf.load(run_dir / "config.yaml")
    return RunWeights(run_dir, ref.step, weights, use_ema, state.get("job", {}), config)
